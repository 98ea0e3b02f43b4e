"""A source's field mapping (vendor property -> canonical trait) and its commands."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from service.cli import main
from service.db import create_engine
from service.settings import Settings
from service.sources import SourceError, configure_source
from tests.conftest import SHARED, Db, Sender, lead_event
from tests.service.sources_support import create_source, lead_traits, stored_events
from tests.service.test_source_hubspot import app_events, hs_event, signed

MAUTIC_SAMPLE = SHARED / "fixtures" / "mautic" / "lead_post_save_new.json"


def mautic_post(body: bytes, secret: str) -> dict[str, str]:
    signature = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()
    return {"content-type": "application/json", "webhook-signature": signature}


@pytest.mark.anyio
async def test_hubspot_property_changes_are_renamed_or_dropped(
    client: httpx.AsyncClient, settings: Settings, db: Db
) -> None:
    secret = await create_source(
        settings,
        "hubspot",
        "hubspot",
        secret=str(uuid.uuid4()),
        mapping={"jobtitle": "What is your current occupation", "hs_analytics_source_data_1": None},
    )
    body = app_events(
        hs_event(1, propertyName="jobtitle", propertyValue="Working Professional"),
        hs_event(2, propertyName="hs_analytics_source_data_1", propertyValue="google"),
        hs_event(3, propertyName="country", propertyValue="Portugal"),
    )
    response = await client.post("/v1/webhooks/hubspot", content=body, headers=signed(body, secret))
    assert response.status_code == 202, response.text
    lead_id = response.json()["lead_id"]
    assert await lead_traits(db, lead_id) == {
        "What is your current occupation": "Working Professional",
        "country": "Portugal",
    }


@pytest.mark.anyio
async def test_mautic_fields_are_renamed_and_a_change_applies_to_the_next_request(
    client: httpx.AsyncClient, settings: Settings, db: Db
) -> None:
    secret = await create_source(
        settings, "mautic", "mautic", mapping={"country": "Country", "points": "Mautic Points"}
    )
    items = json.loads(MAUTIC_SAMPLE.read_text())
    body = json.dumps({"mautic.lead_post_save_new": items}).encode()
    first = await client.post("/v1/webhooks/mautic", content=body, headers=mautic_post(body, secret))
    assert first.status_code == 202, first.text
    traits = await lead_traits(db, first.json()["lead_id"])
    assert (traits["Country"], traits["Mautic Points"], "country" in traits) == ("Czech Republic", 0, False)

    engine = create_engine(settings.database_url)
    try:
        await configure_source(engine, name="mautic", mapping={"city": "City"})
    finally:
        await engine.dispose()
    items[0]["timestamp"] = "2017-06-19T09:40:00+00:00"
    items[0]["contact"]["fields"]["core"]["city"]["value"] = "Brno"
    body = json.dumps({"mautic.lead_post_save_new": items}).encode()
    second = await client.post("/v1/webhooks/mautic", content=body, headers=mautic_post(body, secret))
    assert second.status_code == 202, second.text
    traits = await lead_traits(db, first.json()["lead_id"])
    assert (traits["City"], traits["country"]) == ("Brno", "Czech Republic")


@pytest.mark.anyio
async def test_a_standard_source_can_be_mapped_too(
    client: httpx.AsyncClient, sender: Sender, settings: Settings, db: Db
) -> None:
    engine = create_engine(settings.database_url)
    try:
        await configure_source(engine, name="demo", mapping={"country": "Country"})
    finally:
        await engine.dispose()
    response = await sender.post(client, lead_event(id="e-1", traits={"country": "PT", "title": "CTO"}))
    assert response.status_code == 202, response.text
    assert await lead_traits(db, response.json()["lead_id"]) == {"Country": "PT", "title": "CTO"}
    [event] = await stored_events(db)
    assert event["payload"]["traits"] == {"Country": "PT", "title": "CTO"}


@pytest.mark.anyio
@pytest.mark.parametrize(
    "mapping",
    [{"a": ""}, {"": "b"}, {"a": 3}, {"a": ["b"]}, {"a": "x" * 201}],
    ids=["empty-target", "empty-source", "number", "list", "too-long"],
)
async def test_a_bad_mapping_is_refused(settings: Settings, mapping: dict[str, Any]) -> None:
    with pytest.raises(SourceError, match="invalid source configuration"):
        await create_source(settings, "m", "mautic", mapping=mapping)


@pytest.fixture
def cli(db_url: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("LEADSCORE_DATABASE_URL", db_url)
    return CliRunner()


def run(cli: CliRunner, *args: str, input: str | None = None) -> Any:
    result = cli.invoke(main, list(args), input=input, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_sources_commands_set_and_change_the_mapping(cli: CliRunner, tmp_path: Path) -> None:
    yaml_file = tmp_path / "mapping.yaml"
    yaml_file.write_text("# Mautic field alias -> trait\ncountry: Country\nfax: null\n")
    json_file = tmp_path / "mapping.json"
    json_file.write_text(json.dumps({"firstname": "First Name"}))

    created = run(cli, "sources", "add", "mautic", "--scheme", "mautic", "--mapping", str(yaml_file))
    assert created["scheme"] == "mautic"
    assert created["secret"]
    [listed] = run(cli, "sources", "list")
    assert listed["config"] == {"mapping": {"country": "Country", "fax": None}}

    changed = run(cli, "sources", "configure", "mautic", "--mapping", str(json_file))
    assert changed["config"]["mapping"] == {"firstname": "First Name"}
    cleared = run(cli, "sources", "configure", "mautic", "--clear-mapping")
    assert cleared["config"]["mapping"] == {}
    assert run(cli, "sources", "list")[0]["config"] == {}


def test_a_hubspot_source_takes_the_client_secret_from_stdin(cli: CliRunner) -> None:
    client_secret = str(uuid.uuid4())
    created = run(
        cli,
        "sources",
        "add",
        "hs",
        "--scheme",
        "hubspot",
        "--secret-stdin",
        "--signature-versions",
        "v3,v1",
        input=client_secret + "\n",
    )
    assert created["secret"] == client_secret
    assert run(cli, "sources", "list")[0]["config"] == {"signature_versions": ["v3", "v1"]}
    rotated = run(cli, "sources", "rotate", "hs", "--secret-stdin", input="next-secret\n")
    assert rotated["secret"] == "next-secret"
    assert run(cli, "sources", "list")[0]["live_secrets"] == 2
    assert run(cli, "sources", "configure", "hs", "--signature-versions", "v3")["config"]["signature_versions"] == [
        "v3"
    ]


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["sources", "add", "hs", "--scheme", "hubspot"], None, "client secret"),
        (["sources", "add", "hs", "--scheme", "hubspot", "--secret-stdin"], "\n", "1 to 200 characters"),
        (["sources", "add", "x", "--scheme", "segment", "--signature-versions", "v4"], None, "signature_versions"),
        (["sources", "configure", "nope", "--clear-mapping"], None, "no source named"),
        (["sources", "add", "x", "--scheme", "mautic", "--signature-versions", "v1"], None, "a HubSpot setting"),
    ],
)
def test_sources_command_errors_are_clear(cli: CliRunner, args: list[str], stdin: str | None, message: str) -> None:
    result = cli.invoke(main, args, input=stdin)
    assert result.exit_code == 1, result.output
    assert message in result.output


def test_configure_needs_something_to_change(cli: CliRunner, tmp_path: Path) -> None:
    run(cli, "sources", "add", "m", "--scheme", "mautic")
    assert cli.invoke(main, ["sources", "configure", "m"]).exit_code == 2
    mapping = tmp_path / "m.json"
    mapping.write_text("[1, 2]")
    bad = cli.invoke(main, ["sources", "configure", "m", "--mapping", str(mapping)])
    assert bad.exit_code == 1
    assert "not an object" in bad.output
