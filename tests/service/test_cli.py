"""The `leadscore` command against a real database."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from service.auth import hash_key
from service.cli import main
from service.db import create_engine


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
        {"name": "hubspot-eu", "scheme": "standard", "enabled": True, "live_secrets": 1}
    ]
    rotated = run(cli, "sources", "rotate", "hubspot-eu")
    assert isinstance(rotated, dict)
    assert rotated["secret"] != created["secret"]
    assert run(cli, "sources", "list") == [
        {"name": "hubspot-eu", "scheme": "standard", "enabled": True, "live_secrets": 2}
    ]
    assert run(cli, "sources", "retire", "hubspot-eu") == {"name": "hubspot-eu", "retired": 1}
    [live] = rows(db_url, "SELECT secret FROM source_secret WHERE retired_at IS NULL")
    assert live.secret == rotated["secret"]


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
