"""The audit log: a linear hash chain under concurrent writers, refused edits, tamper detection,
paging, filters and the JSON lines export, and the entries key and source changes write."""

from __future__ import annotations

import asyncio
import datetime as dt
import getpass
import hashlib
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import rfc8785
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

import service.audit
from service.audit import GENESIS_HASH, append_audit, verify_chain
from service.auth import Principal, create_key
from service.cli import main
from service.db import create_engine, write_transaction
from service.repositories.tables import audit_entry
from service.settings import Settings
from tests.conftest import REPO_ROOT, Db

pytestmark = pytest.mark.anyio

T0 = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)


async def append(db: Db, n: int = 1, *, one_transaction: bool = False, **fields: Any) -> list[int]:
    """`n` entries, each in its own transaction or all in one."""
    if one_transaction:
        async with write_transaction(db.engine) as conn:
            return [await _append(conn, i, fields) for i in range(n)]
    ids = []
    for i in range(n):
        async with write_transaction(db.engine) as conn:
            ids.append(await _append(conn, i, fields))
    return ids


async def _append(conn: AsyncConnection, i: int, fields: dict[str, Any]) -> int:
    values: dict[str, Any] = {
        "actor": "key:1",
        "role": "ops",
        "action": "thing.changed",
        "entity": "thing",
        "entity_id": str(i),
        "before": {"v": i},
        "after": {"v": i + 1},
        "reason": None,
        "now": T0 + dt.timedelta(minutes=i),
    } | fields
    return await append_audit(conn, **values)


async def entries(db: Db) -> list[Any]:
    async with db.engine.connect() as conn:
        return list(await conn.execute(sa.select(audit_entry).order_by(audit_entry.c.id)))


def expected_hash(entry: dict[str, Any]) -> str:
    """The documented recipe, done independently of the service: SHA-256 over the RFC 8785 JSON
    of every field but `hash`, the time in UTC ISO 8601 with microseconds."""
    fields = {k: v for k, v in entry.items() if k != "hash"}
    at = dt.datetime.fromisoformat(fields["recorded_at"]).astimezone(dt.UTC)
    fields["recorded_at"] = at.isoformat(timespec="microseconds")
    return hashlib.sha256(rfc8785.dumps(fields)).hexdigest()


async def test_entries_chain_from_the_genesis_hash_and_store_json_values(db: Db) -> None:
    at = dt.datetime(2026, 11, 29, 10, 30, 15, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    lead = uuid.uuid4()
    first = await append(
        db,
        before=None,
        after={"at": at, "day": dt.date(2026, 11, 29), "lead": lead, "tags": ("a", "b"), "big": 2**60},
        reason="because",
    )
    second = await append(db)
    assert (first, second) == ([1], [2])
    rows = await entries(db)
    assert rows[0].prev_hash == GENESIS_HASH
    assert rows[1].prev_hash == rows[0].hash
    # Dates become ISO strings, UUIDs strings, tuples lists, integers past 2**53 strings.
    assert rows[0].after == {
        "at": "2026-11-29T10:30:15.123456+02:00",
        "day": "2026-11-29",
        "lead": str(lead),
        "tags": ["a", "b"],
        "big": str(2**60),
    }
    assert rows[0].before is None
    report = await verify_chain(db.engine)
    assert (report.ok, report.checked, report.head_id, report.head_hash) == (True, 2, 2, rows[1].hash)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("now", dt.datetime(2026, 11, 29, 12, 0)),
        ("after", {"x": float("nan")}),
        ("after", {1: "not a string key"}),
        ("after", {"at": dt.datetime(2026, 11, 29, 12, 0)}),
        ("after", object()),
        ("action", ""),
        ("action", "x" * 65),
    ],
)
async def test_bad_entries_are_refused_before_anything_is_written(db: Db, field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=r"."):
        await append(db, **{field: value})
    assert await entries(db) == []


async def test_a_rolled_back_append_leaves_no_entry_and_no_gap(db: Db) -> None:
    async with db.engine.connect() as conn:
        transaction = await conn.begin()
        await _append(conn, 0, {})
        await transaction.rollback()
    assert await append(db) == [1]
    assert (await verify_chain(db.engine)).ok


async def test_concurrent_appends_from_many_connections_keep_one_linear_chain(db: Db, settings: Settings) -> None:
    engine = create_engine(settings.database_url, pool_size=8)

    async def writer(w: int) -> list[int]:
        ids = []
        for i in range(10):
            async with write_transaction(engine) as conn:
                ids.append(
                    await append_audit(
                        conn,
                        actor=f"key:{w}",
                        role="ops",
                        action="thing.changed",
                        entity="thing",
                        entity_id=f"{w}-{i}",
                        before=None,
                        after={"w": w, "i": i},
                        reason=None,
                        now=dt.datetime.now(dt.UTC),
                    )
                )
                # Hold the transaction a moment past the append, so writers overlap.
                await asyncio.sleep(0)
        return ids

    try:
        results = await asyncio.wait_for(asyncio.gather(*(writer(w) for w in range(8))), timeout=120)
    finally:
        await engine.dispose()
    assert sorted(i for ids in results for i in ids) == list(range(1, 81))
    report = await verify_chain(db.engine)
    assert (report.ok, report.checked) == (True, 80)
    rows = await entries(db)
    assert {r.entity_id for r in rows} == {f"{w}-{i}" for w in range(8) for i in range(10)}


APPENDER = """
import asyncio, datetime as dt, sys
from service.audit import append_audit
from service.db import create_engine, write_transaction
from service.repositories.tables import audit_entry

async def main(url, n, tag):
    engine = create_engine(url, pool_size=1)
    try:
        for i in range(n):
            async with write_transaction(engine) as conn:
                await append_audit(conn, actor=tag, role="ops", action="thing.changed", entity="thing",
                                   entity_id=str(i), before=None, after=i, reason=None,
                                   now=dt.datetime.now(dt.UTC))
    finally:
        await engine.dispose()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""


async def test_concurrent_appends_from_several_processes_keep_one_linear_chain(db: Db, settings: Settings) -> None:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", APPENDER, settings.database_url, "15", f"proc:{p}", cwd=REPO_ROOT
        )
        for p in range(3)
    ]
    codes = await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), timeout=120)
    assert codes == [0, 0, 0]
    report = await verify_chain(db.engine)
    assert (report.ok, report.checked) == (True, 45)
    assert await db.scalar("SELECT count(DISTINCT actor) FROM audit_entry") == 3


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE audit_entry SET reason = 'edited' WHERE id = 1",
        "UPDATE audit_entry SET hash = prev_hash",
        "DELETE FROM audit_entry WHERE id = 2",
        "DELETE FROM audit_entry",
    ],
)
async def test_the_database_refuses_to_change_or_delete_entries(db: Db, sql: str) -> None:
    await append(db, 2)
    with pytest.raises(DBAPIError, match="append-only"):
        async with db.engine.begin() as conn:
            await conn.execute(text(sql))
    assert (await verify_chain(db.engine)).checked == 2


async def test_the_whole_log_cannot_be_emptied(db: Db) -> None:
    await append(db)
    # Row triggers do not fire on PostgreSQL's TRUNCATE: it has a statement trigger of its own.
    # SQLite has no TRUNCATE, and its DELETE without WHERE (truncate-optimised) fires the row trigger.
    statement = "TRUNCATE audit_entry" if db.engine.dialect.name == "postgresql" else "DELETE FROM audit_entry"
    with pytest.raises(DBAPIError, match="append-only"):
        async with db.engine.begin() as conn:
            await conn.execute(text(statement))
    assert len(await entries(db)) == 1


async def _without_guards(db: Db, *statements: str) -> None:
    """Run statements as someone who switched the append-only triggers off."""
    async with db.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text("ALTER TABLE audit_entry DISABLE TRIGGER audit_entry_append_only"))
        else:
            await conn.execute(text("DROP TRIGGER IF EXISTS audit_entry_no_update"))
            await conn.execute(text("DROP TRIGGER IF EXISTS audit_entry_no_delete"))
        for statement in statements:
            await conn.execute(text(statement))


def verify_cli(db_url: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, dict[str, Any]]:
    monkeypatch.setenv("LEADSCORE_DATABASE_URL", db_url)
    result = CliRunner().invoke(main, ["audit", "verify"])
    return result.exit_code, json.loads(result.stdout)


async def verify_in_thread(db_url: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, dict[str, Any]]:
    # The CLI runs its own event loop.
    return await asyncio.to_thread(verify_cli, db_url, monkeypatch)


async def test_verify_reports_ok_with_the_count_and_head(db: Db, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    await append(db, 4)
    code, out = await verify_in_thread(db_url, monkeypatch)
    head = (await entries(db))[-1]
    assert (code, out) == (0, {"ok": True, "entries": 4, "head": {"id": 4, "hash": head.hash}})


async def test_an_edited_entry_is_named(db: Db, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    await append(db, 6)
    after = json.dumps({"v": 1000})
    await _without_guards(db, f"UPDATE audit_entry SET after = '{after}' WHERE id = 3")
    code, out = await verify_in_thread(db_url, monkeypatch)
    assert code == 1
    assert out["broken"]["entry_id"] == 3
    assert out["entries_verified"] == 2
    assert "contents changed" in out["broken"]["problem"]


async def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(db: Db) -> None:
    await append(db, 5)
    await _without_guards(db, f"UPDATE audit_entry SET hash = '{'ab' * 32}' WHERE id = 2")
    report = await verify_chain(db.engine)
    # Entry 2's own hash no longer matches its fields...
    assert report.broken is not None
    assert report.broken.entry_id == 2
    # ...and had the forger recomputed it, entry 3 would point at the old one.
    rows = await entries(db)
    forged = {c: getattr(rows[1], c) for c in rows[1]._fields}
    forged["after"] = {"v": 99}
    forged["recorded_at"] = rows[1].recorded_at.isoformat()
    new_hash = expected_hash(forged)
    await _without_guards(
        db, f"UPDATE audit_entry SET after = '{json.dumps(forged['after'])}', hash = '{new_hash}' WHERE id = 2"
    )
    report = await verify_chain(db.engine)
    assert report.broken is not None
    assert report.broken.entry_id == 3
    assert "does not match entry 2's hash" in report.broken.problem


async def test_a_deleted_entry_is_named(db: Db, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    await append(db, 6)
    await _without_guards(db, "DELETE FROM audit_entry WHERE id = 4")
    code, out = await verify_in_thread(db_url, monkeypatch)
    assert code == 1
    assert out["broken"]["entry_id"] == 5
    assert "entry 4 missing" in out["broken"]["problem"]


async def test_a_deleted_first_entry_is_named(db: Db) -> None:
    await append(db, 3)
    await _without_guards(db, "DELETE FROM audit_entry WHERE id = 1")
    report = await verify_chain(db.engine)
    assert report.broken is not None
    assert (report.broken.entry_id, report.checked) == (2, 0)


# --- reading through the API ---------------------------------------------------------------------


async def viewer_headers(settings: Settings) -> dict[str, str]:
    engine = create_engine(settings.database_url)
    try:
        key = await create_key(engine, name="reader", role="viewer", now=T0 - dt.timedelta(days=1))
    finally:
        await engine.dispose()
    return {"authorization": f"Bearer {key.key}"}


async def test_pages_newest_first_by_default_and_follow_next(
    client: httpx.AsyncClient, settings: Settings, db: Db
) -> None:
    headers = await viewer_headers(settings)  # entry 1: the key's creation
    await append(db, 6)
    seen: list[int] = []
    url: str | None = "/v1/audit?limit=3"
    pages = 0
    while url is not None and pages < 10:
        response = await client.get(url, headers=headers)
        assert response.status_code == 200, response.text
        page = response.json()
        seen += [e["id"] for e in page["entries"]]
        url = page["next"]
        pages += 1
    assert seen == [7, 6, 5, 4, 3, 2, 1]
    assert pages == 3

    oldest = (await client.get("/v1/audit?order=oldest&limit=4&after=2", headers=headers)).json()
    assert [e["id"] for e in oldest["entries"]] == [3, 4, 5, 6]
    assert oldest["next"] == "/v1/audit?order=oldest&limit=4&after=6"
    last = (await client.get(oldest["next"], headers=headers)).json()
    assert ([e["id"] for e in last["entries"]], last["next"]) == ([7], None)
    window = (await client.get("/v1/audit?after=2&before=5", headers=headers)).json()
    assert [e["id"] for e in window["entries"]] == [4, 3]


async def test_filters(client: httpx.AsyncClient, settings: Settings, db: Db) -> None:
    headers = await viewer_headers(settings)
    await append(db, 3, actor="cli:ana", action="source.disabled", entity="source", entity_id="mautic")
    await append(db, 2, actor="oidc:bo", action="change_request.approved", entity="change_request")

    async def ids(query: str) -> list[int]:
        response = await client.get(f"/v1/audit?order=oldest&{query}", headers=headers)
        assert response.status_code == 200, response.text
        return [e["id"] for e in response.json()["entries"]]

    assert await ids("action=source.disabled") == [2, 3, 4]
    assert await ids("actor=oidc:bo") == [5, 6]
    assert await ids("entity=api_key") == [1]
    assert await ids("entity=change_request&entity_id=1") == [6]
    # T0 + 0, 1, 2 minutes, then T0 + 0, 1 minutes; `until` is exclusive.
    assert await ids("since=2026-11-29T12:01:00Z") == [3, 4, 6]
    assert await ids("since=2026-11-29T12:01:00%2B00:00&until=2026-11-29T12:02:00Z") == [3, 6]
    assert await ids("actor=cli:ana&since=2026-11-29T13:00:00%2B01:00&until=2026-11-29T12:01:00Z") == [2]
    naive = await client.get("/v1/audit?since=2026-11-29T12:00:00", headers=headers)
    assert (naive.status_code, naive.json()["error"]) == (422, "InvalidRequest")
    bad_limit = await client.get("/v1/audit?limit=0", headers=headers)
    assert bad_limit.status_code == 422


async def test_json_lines_export_streams_every_entry_and_can_be_rechecked_by_anyone(
    client: httpx.AsyncClient, settings: Settings, db: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service.audit, "EXPORT_BATCH_SIZE", 7)  # several batches, a partial last one
    headers = await viewer_headers(settings)
    await append(db, 45, one_transaction=True)
    response = await client.get("/v1/audit?order=oldest", headers=headers | {"accept": "application/x-ndjson"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [e["id"] for e in lines] == list(range(1, 47))
    previous = GENESIS_HASH
    for entry in lines:
        assert entry["prev_hash"] == previous
        assert expected_hash(entry) == entry["hash"]
        previous = entry["hash"]

    by_param = await client.get("/v1/audit?format=jsonl&limit=5&action=thing.changed", headers=headers)
    assert by_param.headers["content-type"].startswith("application/x-ndjson")
    assert [json.loads(line)["id"] for line in by_param.text.splitlines()] == [46, 45, 44, 43, 42]
    as_json = await client.get("/v1/audit?format=json&limit=1", headers=headers | {"accept": "application/x-ndjson"})
    assert as_json.json()["entries"][0]["id"] == 46


async def test_the_audit_log_needs_a_credential(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/audit")
    assert (response.status_code, response.json()["error"]) == (401, "Unauthenticated")


# --- what writes entries -------------------------------------------------------------------------


def cli_run(db_url: str, monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
    monkeypatch.setenv("LEADSCORE_DATABASE_URL", db_url)
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


async def test_cli_key_and_source_changes_are_audited_without_secrets(
    db: Db, db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def commands() -> list[Any]:
        out = [cli_run(db_url, monkeypatch, "sources", "add", "mautic", "--reason", "new MAP")]
        out.append(cli_run(db_url, monkeypatch, "sources", "rotate", "mautic"))
        out.append(cli_run(db_url, monkeypatch, "sources", "retire", "mautic", "--reason", "rotation done"))
        out.append(cli_run(db_url, monkeypatch, "sources", "retire", "mautic"))  # nothing to retire: no entry
        out.append(cli_run(db_url, monkeypatch, "sources", "disable", "mautic"))
        out.append(cli_run(db_url, monkeypatch, "sources", "disable", "mautic"))  # no change: no entry
        out.append(cli_run(db_url, monkeypatch, "sources", "enable", "mautic"))
        mapping = tmp_path / "mapping.yaml"
        mapping.write_text("lead_source: Lead Source\n")
        out.append(cli_run(db_url, monkeypatch, "sources", "configure", "mautic", "--mapping", str(mapping)))
        key = cli_run(db_url, monkeypatch, "keys", "create", "--role", "viewer", "--name", "grafana")
        out.append(key)
        out.append(cli_run(db_url, monkeypatch, "keys", "revoke", str(key["id"]), "--reason", "leaked"))
        return out

    outputs = await asyncio.to_thread(commands)
    rows = await entries(db)
    actor = f"cli:{getpass.getuser()}"
    assert [(r.action, r.entity, r.entity_id, r.actor, r.role) for r in rows] == [
        ("source.created", "source", "mautic", actor, "ops"),
        ("source.secret_rotated", "source", "mautic", actor, "ops"),
        ("source.secrets_retired", "source", "mautic", actor, "ops"),
        ("source.disabled", "source", "mautic", actor, "ops"),
        ("source.enabled", "source", "mautic", actor, "ops"),
        ("source.configured", "source", "mautic", actor, "ops"),
        ("api_key.created", "api_key", str(outputs[8]["id"]), actor, "ops"),
        ("api_key.revoked", "api_key", str(outputs[8]["id"]), actor, "ops"),
    ]
    assert [r.reason for r in rows] == ["new MAP", None, "rotation done", None, None, None, None, "leaked"]
    assert rows[0].before is None
    assert rows[0].after == {"name": "mautic", "scheme": "standard", "enabled": True, "live_secrets": 1, "config": {}}
    assert (rows[5].before["config"], rows[5].after["config"]) == ({}, {"mapping": {"lead_source": "Lead Source"}})
    assert (rows[1].before["live_secrets"], rows[1].after["live_secrets"]) == (1, 2)
    assert (rows[2].before["live_secrets"], rows[2].after["live_secrets"]) == (2, 1)
    assert (rows[3].before["enabled"], rows[3].after["enabled"]) == (True, False)
    assert rows[6].after == {
        "id": outputs[8]["id"],
        "name": "grafana",
        "role": "viewer",
        "expires_at": None,
        "revoked_at": None,
    }
    assert rows[7].after["revoked_at"] is not None
    dumped = json.dumps([[str(v) for v in r] for r in rows])
    key_hash = await db.scalar("SELECT key_hash FROM api_key")
    for secret in (outputs[0]["secret"], outputs[1]["secret"], outputs[8]["key"], outputs[8]["key"][:12], key_hash):
        assert secret not in dumped
    assert (await verify_chain(db.engine)).checked == 8


async def test_api_key_changes_are_audited_with_the_callers_subject(
    client: httpx.AsyncClient, settings: Settings, db: Db
) -> None:
    engine = create_engine(settings.database_url)
    try:
        ops = await create_key(engine, name="ops-ana", role="ops", now=T0, actor=Principal("cli:ana", "ops", "ana"))
    finally:
        await engine.dispose()
    headers = {"authorization": f"Bearer {ops.key}"}
    created = await client.post(
        "/v1/keys", json={"name": "looker", "role": "viewer", "expires_in_days": 30, "reason": "BI"}, headers=headers
    )
    assert created.status_code == 201, created.text
    key_id = created.json()["id"]
    revoked = await client.delete(f"/v1/keys/{key_id}?reason=unused", headers=headers)
    assert revoked.status_code == 200
    rows = await entries(db)
    assert [(r.actor, r.role, r.action, r.entity_id, r.reason) for r in rows] == [
        ("cli:ana", "ops", "api_key.created", str(ops.id), None),
        (f"key:{ops.id}", "ops", "api_key.created", str(key_id), "BI"),
        (f"key:{ops.id}", "ops", "api_key.revoked", str(key_id), "unused"),
    ]
    assert rows[1].after["expires_at"] == created.json()["expires_at"].replace("Z", "+00:00")
    assert created.json()["key"] not in json.dumps([[str(v) for v in r] for r in rows])
