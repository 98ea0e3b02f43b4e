"""`leadscore deliveries ...` and `leadscore worker` against a real database."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from service.cli import main
from service.crm import Handoff
from service.db import create_engine, write_transaction
from service.delivery import enqueue_deliveries, handoff_item


@pytest.fixture
def cli(db_url: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("LEADSCORE_DATABASE_URL", db_url)
    return CliRunner()


def seed(db_url: str, keys: list[str], dead: list[str]) -> list[uuid.UUID]:
    async def go() -> list[uuid.UUID]:
        engine = create_engine(db_url)
        try:
            items = [
                handoff_item(Handoff(lead_id=uuid.uuid4(), email=f"{k}@acme.io", stage="mql"), "crm", handoff_key=k)
                for k in keys
            ]
            async with write_transaction(engine) as conn:
                ids = await enqueue_deliveries(conn, items, now=dt.datetime.now(dt.UTC))
                for key in dead:
                    await conn.execute(
                        text("UPDATE delivery SET status = 'dead', last_status_code = 400 WHERE idempotency_key = :k"),
                        {"k": f"crm:{key}"},
                    )
            return ids
        finally:
            await engine.dispose()

    return asyncio.run(go())


def test_list_and_replay_deliveries(cli: CliRunner, db_url: str) -> None:
    ids = seed(db_url, ["a", "b", "c"], dead=["a", "b"])
    listed = cli.invoke(main, ["deliveries", "list", "--status", "dead"], catch_exceptions=False)
    assert listed.exit_code == 0, listed.output
    assert {d["idempotency_key"] for d in json.loads(listed.stdout)} == {"crm:a", "crm:b"}

    one = cli.invoke(main, ["deliveries", "replay", str(ids[0])], catch_exceptions=False)
    assert json.loads(one.stdout) == {"id": str(ids[0]), "status": "pending"}
    again = cli.invoke(main, ["deliveries", "replay", str(ids[0])])
    assert again.exit_code == 1
    assert "DeliveryNotReplayable" in again.output

    bulk = cli.invoke(main, ["deliveries", "replay", "--dead", "--destination", "crm"], catch_exceptions=False)
    assert json.loads(bulk.stdout) == {"replayed": 1}
    assert json.loads(cli.invoke(main, ["deliveries", "list", "--status", "dead"]).stdout) == []
    assert len(json.loads(cli.invoke(main, ["deliveries", "list", "--status", "pending"]).stdout)) == 3


def test_replay_needs_an_id_or_dead(cli: CliRunner) -> None:
    assert cli.invoke(main, ["deliveries", "replay"]).exit_code == 2
    assert cli.invoke(main, ["deliveries", "replay", "not-a-uuid"]).exit_code == 2


def test_worker_refuses_invalid_destinations(cli: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEADSCORE_DELIVERY_DESTINATIONS", json.dumps([{"name": "x", "kind": "ftp"}]))
    result = cli.invoke(main, ["worker"])
    assert result.exit_code == 1
    assert "invalid destinations" in result.output
    monkeypatch.setenv(
        "LEADSCORE_DELIVERY_DESTINATIONS",
        json.dumps([{"name": "x", "kind": "hubspot", "token_env": "LEADSCORE_TEST_UNSET_TOKEN"}]),
    )
    monkeypatch.delenv("LEADSCORE_TEST_UNSET_TOKEN", raising=False)
    result = cli.invoke(main, ["worker"])
    assert result.exit_code == 1
    assert "LEADSCORE_TEST_UNSET_TOKEN is not set" in result.output
