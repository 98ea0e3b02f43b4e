"""The `leadscore` command against a real database."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from service.auth import hash_key
from service.cli import main
from service.db import create_engine
from service.settings import Settings
from tests.conftest import REPO_ROOT, SHARED


def rows(db_url: str, sql: str) -> list[Any]:
    """Query the database from a synchronous test (the CLI runs its own event loop)."""

    async def go() -> list[Any]:
        engine = create_engine(db_url)
        try:
            async with engine.connect() as conn:
                return list(await conn.execute(text(sql)))
        finally:
            await engine.dispose()

    return asyncio.run(go())


@pytest.fixture
def cli(db_url: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("LEADSCORE_DATABASE_URL", db_url)
    return CliRunner()


def run(cli: CliRunner, *args: str) -> object:
    result = cli.invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_sources_add_list_rotate_retire(cli: CliRunner, db_url: str) -> None:
    created = run(cli, "sources", "add", "hubspot-eu", "--scheme", "standard")
    assert isinstance(created, dict)
    assert created["secret"].startswith("whsec_")
    assert run(cli, "sources", "list") == [
        {"name": "hubspot-eu", "scheme": "standard", "enabled": True, "live_secrets": 1, "config": {}}
    ]
    rotated = run(cli, "sources", "rotate", "hubspot-eu")
    assert isinstance(rotated, dict)
    assert rotated["secret"] != created["secret"]
    assert run(cli, "sources", "list") == [
        {"name": "hubspot-eu", "scheme": "standard", "enabled": True, "live_secrets": 2, "config": {}}
    ]
    assert run(cli, "sources", "retire", "hubspot-eu") == {"name": "hubspot-eu", "retired": 1}
    [live] = rows(db_url, "SELECT secret FROM source_secret WHERE retired_at IS NULL")
    assert live.secret == rotated["secret"]


def test_sources_disable_and_enable(cli: CliRunner, db_url: str) -> None:
    run(cli, "sources", "add", "mautic")
    assert run(cli, "sources", "disable", "mautic") == {"name": "mautic", "enabled": False}
    assert rows(db_url, "SELECT enabled FROM source WHERE name = 'mautic'") == [(False,)]
    assert run(cli, "sources", "enable", "mautic") == {"name": "mautic", "enabled": True}
    assert rows(db_url, "SELECT enabled FROM source WHERE name = 'mautic'") == [(True,)]
    assert cli.invoke(main, ["sources", "disable", "nope"]).exit_code == 1


def test_sources_errors_are_clear(cli: CliRunner) -> None:
    run(cli, "sources", "add", "a")
    again = cli.invoke(main, ["sources", "add", "a"])
    assert again.exit_code == 1
    assert "exists" in again.output
    unknown = cli.invoke(main, ["sources", "add", "b", "--scheme", "carrier-pigeon"])
    assert unknown.exit_code == 1
    assert "unknown scheme" in unknown.output
    missing = cli.invoke(main, ["sources", "rotate", "nope"])
    assert missing.exit_code == 1


def test_keys_create_stores_only_a_hash_and_revoke_works(cli: CliRunner, db_url: str) -> None:
    created = run(cli, "keys", "create", "--role", "viewer", "--name", "grafana")
    assert isinstance(created, dict)
    assert created["key"].startswith("lsk_")
    [row] = rows(db_url, "SELECT key_hash, role, prefix FROM api_key")
    assert row.key_hash == hash_key(created["key"])
    assert created["key"] not in json.dumps([str(v) for v in row])
    listed = run(cli, "keys", "list")
    assert isinstance(listed, list)
    assert "key" not in listed[0]
    assert "key_hash" not in listed[0]
    assert run(cli, "keys", "revoke", str(created["id"])) == {"id": created["id"], "revoked": True}
    assert cli.invoke(main, ["keys", "revoke", str(created["id"])]).exit_code == 1
    bad_role = cli.invoke(main, ["keys", "create", "--role", "admin", "--name", "x"])
    assert bad_role.exit_code == 2


DATA = SHARED / "data" / "x-education" / "leads_train.csv"
SPEC = REPO_ROOT / "pipelines" / "x-education.yaml"


def test_train_registers_an_active_version_that_meets_the_bar_and_scores_a_file(
    cli: CliRunner, db_url: str, tmp_path: Path
) -> None:
    trained = run(cli, "train", "--spec", str(SPEC), "--data", str(DATA), "--label", "Converted", "--activate")
    assert isinstance(trained, dict)
    assert trained["activated"] is True
    cv = trained["metrics"]["cv"]
    # The bar for the shipped spec on this data.
    assert cv["roc_auc"]["mean"] >= 0.85
    assert cv["brier"]["mean"] <= 0.15
    [version] = rows(db_url, "SELECT id, training_data_sha256, sklearn_version FROM pipeline_version")
    assert version.training_data_sha256 == hashlib.sha256(DATA.read_bytes()).hexdigest()
    assert rows(db_url, "SELECT slot, version_id FROM pipeline_slot") == [("active", version.id)]

    out = tmp_path / "scores.csv"
    result = cli.invoke(main, ["score", "--data", str(DATA), "--out", str(out), "--id-column", "Prospect ID"])
    assert result.exit_code == 0, result.output
    with out.open() as f:
        scored = list(csv.DictReader(f))
    with DATA.open() as f:
        source = list(csv.DictReader(f))
    assert [r["Prospect ID"] for r in scored] == [r["Prospect ID"] for r in source]
    assert all(0 <= float(r["score"]) <= 100 and 0 <= float(r["probability"]) <= 1 for r in scored)
    assert {r["grade"][0] for r in scored} <= set("ABCD")

    listed = run(cli, "pipelines", "list")
    assert isinstance(listed, list)
    assert listed[0]["active"] is True
    # The first activation was a bootstrap change request, applied at once.
    [bootstrap] = rows(db_url, "SELECT kind, status, bootstrap FROM change_request")
    assert tuple(bootstrap) == ("active_pipeline", "applied", True)


def test_pipeline_slots_change_through_change_requests(
    cli: CliRunner, db_url: str, monkeypatch: pytest.MonkeyPatch, trained: Any
) -> None:
    from tests.service.test_scoring_service import register

    settings = Settings(database_url=db_url, _env_file=None)  # type: ignore[call-arg]
    version = asyncio.run(register(settings, trained))
    shadow = run(cli, "pipelines", "shadow", str(version), "--reason", "try it")
    assert isinstance(shadow, dict)
    assert (shadow["kind"], shadow["status"], shadow["bootstrap"]) == ("shadow_pipeline", "pending", False)
    own = cli.invoke(main, ["change-requests", "approve", str(shadow["id"])])
    assert own.exit_code == 1
    assert "SelfApprovalRefused" in own.output
    assert rows(db_url, "SELECT count(*) FROM pipeline_slot WHERE slot = 'shadow'") == [(0,)]
    no_reason = cli.invoke(main, ["pipelines", "activate", str(version)])
    assert no_reason.exit_code == 1
    assert "needs a reason" in no_reason.output
    missing = cli.invoke(main, ["pipelines", "activate", "99", "--reason", "x"])
    assert missing.exit_code == 1
    assert "no pipeline version 99" in missing.output
    rejected = run(cli, "change-requests", "reject", str(shadow["id"]), "--reason", "not now")
    assert isinstance(rejected, dict)
    assert rejected["status"] == "rejected"
    monkeypatch.setenv("LEADSCORE_REQUIRE_APPROVAL", "false")
    applied = run(cli, "pipelines", "shadow", str(version), "--reason", "try it")
    assert isinstance(applied, dict)
    assert applied["status"] == "applied"
    assert rows(db_url, "SELECT version_id FROM pipeline_slot WHERE slot = 'shadow'") == [(version,)]
    listed = run(cli, "change-requests", "list", "--status", "applied")
    assert isinstance(listed, list)
    assert [r["id"] for r in listed] == [applied["id"]]
    shown = run(cli, "change-requests", "show", str(shadow["id"]))
    assert isinstance(shown, dict)
    assert shown["close_reason"] == "not now"


def test_train_refuses_a_missing_label_and_a_bad_spec(cli: CliRunner, tmp_path: Path) -> None:
    no_label = cli.invoke(main, ["train", "--spec", str(SPEC), "--data", str(DATA), "--label", "Won"])
    assert no_label.exit_code == 1
    assert "no column 'Won'" in no_label.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfeatures: 3\n")
    invalid = cli.invoke(main, ["train", "--spec", str(bad), "--data", str(DATA), "--label", "Converted"])
    assert invalid.exit_code == 1
    assert "invalid spec" in invalid.output
    assert "features" in invalid.output


def test_score_without_an_active_pipeline_says_so(cli: CliRunner, tmp_path: Path) -> None:
    result = cli.invoke(main, ["score", "--data", str(DATA), "--out", str(tmp_path / "o.csv")])
    assert result.exit_code == 1
    assert "NoActivePipeline" in result.output


def test_thresholds_propose_from_a_file(cli: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = REPO_ROOT / "pipelines" / "x-education-thresholds.yaml"
    proposed = run(cli, "thresholds", "propose", str(example), "--reason", "first line", "--reevaluate")
    assert isinstance(proposed, dict)
    assert (proposed["kind"], proposed["status"], proposed["impact"]["changes"]) == ("threshold_policy", "pending", 0)
    assert run(cli, "thresholds", "list") == []
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndefault: {mql: {field: visits, op: gte, value: 1}}\n")
    refused = cli.invoke(main, ["thresholds", "propose", str(bad), "--reason", "x"])
    assert refused.exit_code == 1
    assert "unknown score field 'visits'" in refused.output
    monkeypatch.setenv("LEADSCORE_REQUIRE_APPROVAL", "false")
    applied = run(cli, "thresholds", "propose", str(example), "--reason", "now")
    assert isinstance(applied, dict)
    assert applied["status"] == "applied"
    listed = run(cli, "thresholds", "list")
    assert isinstance(listed, list)
    assert [(p["version"], p["active"], p["name"]) for p in listed] == [(1, True, "x-education-example")]
