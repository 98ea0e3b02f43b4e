"""The audit log: one append-only, hash-chained entry per change made by a person or a tool.

Every entry's `hash` is the SHA-256 of its fields in RFC 8785 (JCS) canonical JSON, `prev_hash`
(the previous entry's `hash`) included; the first entry's `prev_hash` is 64 zeros. Editing an entry
breaks its own hash; deleting one leaves a gap in the ids and a `prev_hash` that points at nothing.
`leadscore audit verify` walks the chain and names the first broken link. Anyone holding an export
(`GET /v1/audit`, JSON lines) can re-check it with any JCS implementation.

What the chain cannot show on its own is the newest entries being cut off: keep the head that
`verify` prints (id and hash) somewhere else to detect that too.

Writers call `append_audit` inside the transaction that makes the change, so an entry exists exactly
when the change was committed. Actions are named `<entity>.<past-tense verb>`: `api_key.created`,
`source.secret_rotated`, `change_request.approved`. Never put a secret in `before`, `after` or
`reason`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import hashlib
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import rfc8785
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.repositories import audit as repo
from service.repositories.audit import AuditFilter, AuditRow

GENESIS_HASH = "0" * 64
# JSON numbers are IEEE doubles for most readers (and for RFC 8785): larger integers become strings.
_MAX_SAFE_INT = 2**53 - 1
EXPORT_BATCH_SIZE = 1000  # entries read per statement while streaming an export
_LIMITS = {"actor": 300, "role": 16, "action": 64, "entity": 64, "entity_id": 200}


def jsonable(value: Any) -> Any:
    """`value` as plain JSON values: datetimes, dates and times as ISO 8601 strings (a datetime
    must be timezone-aware), UUIDs and Decimals as strings, enums as their values, pydantic models
    and dataclasses as objects, tuples and sets as lists, integers beyond +-2**53 as strings.
    Object keys must be strings; NaN and infinities are refused (`ValueError`)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT else str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("NaN and infinities have no JSON form")
        return value
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime in an audit value; pass timezone-aware times")
        return value.isoformat()
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID | decimal.Decimal):
        return str(value)
    if isinstance(value, BaseModel):
        return jsonable(value.model_dump(mode="json"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"audit values need string object keys, not {type(key).__name__}")
            out[key] = jsonable(item)
        return out
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, set | frozenset):
        return sorted((jsonable(item) for item in value), key=lambda v: rfc8785.dumps(v))
    raise ValueError(f"{type(value).__name__} is not a JSON value")


def _timestamp(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).isoformat(timespec="microseconds")


def _hashed_fields(row: AuditRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "recorded_at": _timestamp(row.recorded_at),
        "actor": row.actor,
        "role": row.role,
        "action": row.action,
        "entity": row.entity,
        "entity_id": row.entity_id,
        "before": row.before,
        "after": row.after,
        "reason": row.reason,
        "prev_hash": row.prev_hash,
    }


def entry_hash(row: AuditRow) -> str:
    """SHA-256 (hex) of the entry's RFC 8785 canonical JSON, every field but `hash` itself."""
    return hashlib.sha256(rfc8785.dumps(_hashed_fields(row))).hexdigest()


async def append_audit(
    conn: AsyncConnection,
    *,
    actor: str,
    role: str,
    action: str,
    entity: str,
    entity_id: str | None,
    before: Any,
    after: Any,
    reason: str | None,
    now: dt.datetime,
) -> int:
    """Append one entry in the caller's open transaction and return its id.

    `actor` is a principal's subject (`key:7`, `oidc:<sub>`, `cli:<user>`), `role` its role then.
    `before`/`after` are JSON-able values (see `jsonable`; None when there is no before or after);
    `now` must be timezone-aware. Appends are serialised (a PostgreSQL advisory lock held to the end
    of the caller's transaction; on SQLite open the transaction with `service.db.write_transaction`,
    which takes the write lock up front), so the chain stays linear across connections and
    processes. The entry is visible, and the lock released, when the caller commits; a rollback
    leaves no entry and no gap.
    """
    if now.tzinfo is None:
        raise ValueError("append_audit needs a timezone-aware `now`")
    labels = {"actor": actor, "role": role, "action": action, "entity": entity, "entity_id": entity_id}
    for name, value in labels.items():
        if value is None and name == "entity_id":
            continue
        if not value:
            raise ValueError(f"audit {name} must not be empty")
        if len(value) > _LIMITS[name]:
            raise ValueError(f"audit {name} is longer than {_LIMITS[name]} characters")
    # Round-trip through JSON first: what is hashed is exactly what is stored and read back.
    before_json, after_json = jsonable(before), jsonable(after)
    head = await repo.lock_head(conn)
    entry_id, prev_hash = (1, GENESIS_HASH) if head is None else (head[0] + 1, head[1])
    row = AuditRow(
        id=entry_id,
        # Stored to the microsecond on both backends; hashed at that precision.
        recorded_at=now.astimezone(dt.UTC),
        actor=actor,
        role=role,
        action=action,
        entity=entity,
        entity_id=entity_id,
        before=before_json,
        after=after_json,
        reason=reason,
        prev_hash=prev_hash,
        hash="",
    )
    await repo.insert_entry(conn, dataclasses.replace(row, hash=entry_hash(row)))
    return entry_id


# --- verifying ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokenLink:
    entry_id: int
    problem: str


@dataclass(frozen=True)
class ChainReport:
    """The result of walking the chain: how many entries were checked, the last good one, and
    the first broken link (None when the whole chain holds)."""

    checked: int
    head_id: int | None
    head_hash: str | None
    broken: BrokenLink | None

    @property
    def ok(self) -> bool:
        return self.broken is None


def check_entry(row: AuditRow, *, expected_id: int, expected_prev: str) -> str | None:
    """What is wrong with `row` as the entry after (expected_id - 1, expected_prev), or None."""
    if row.id != expected_id:
        missing = f"entry {expected_id}" if row.id == expected_id + 1 else f"entries {expected_id}-{row.id - 1}"
        if row.id < expected_id:
            return f"id {row.id} is out of sequence (expected {expected_id})"
        return f"{missing} missing before it (deleted?)"
    computed = entry_hash(row)
    if computed != row.hash:
        return f"contents changed since it was written: stored hash {row.hash}, computed from its fields {computed}"
    if row.prev_hash != expected_prev:
        previous = "the start of the log" if expected_id == 1 else f"entry {expected_id - 1}'s hash {expected_prev}"
        return f"prev_hash {row.prev_hash} does not match {previous}"
    return None


async def verify_chain(engine: AsyncEngine, *, batch_size: int = 1000) -> ChainReport:
    """Walk every entry in id order and check each link; stops at the first broken one."""
    checked, head_id, head_hash = 0, None, None
    expected_id, expected_prev = 1, GENESIS_HASH
    async with engine.connect() as conn:
        async for batch in repo.iter_entries(conn, batch_size=batch_size):
            for row in batch:
                problem = check_entry(row, expected_id=expected_id, expected_prev=expected_prev)
                if problem is not None:
                    return ChainReport(checked, head_id, head_hash, BrokenLink(row.id, problem))
                checked += 1
                head_id, head_hash = row.id, row.hash
                expected_id, expected_prev = row.id + 1, row.hash
    return ChainReport(checked, head_id, head_hash, None)


# --- reading --------------------------------------------------------------------------------------


class AuditEntryRead(BaseModel):
    """One audit entry, with the hashes that chain it to the one before."""

    id: int
    recorded_at: dt.datetime
    actor: str = Field(description="Who: `key:<id>`, `oidc:<sub>`, `cli:<OS user>` or `system:<what>`.")
    role: str = Field(description="The actor's role when it acted.")
    action: str = Field(description="`<entity>.<verb>`, e.g. `api_key.revoked`.", examples=["source.secret_rotated"])
    entity: str
    entity_id: str | None
    before: Any = Field(description="The changed thing before the change (null if it did not exist).")
    after: Any = Field(description="The changed thing after the change (null if it no longer exists).")
    reason: str | None
    prev_hash: str
    hash: str = Field(description="SHA-256 of this entry's RFC 8785 canonical JSON (all fields but `hash`).")


class AuditPage(BaseModel):
    entries: list[AuditEntryRead]
    next: str | None = Field(description="The query string of the next page (null on the last page).")


Order = Literal["newest", "oldest"]


def _read(row: AuditRow) -> AuditEntryRead:
    return AuditEntryRead(**vars(row))


async def read_audit(
    engine: AsyncEngine,
    *,
    filters: AuditFilter,
    after_id: int | None,
    before_id: int | None,
    order: Order,
    limit: int,
) -> tuple[list[AuditEntryRead], int | None]:
    """One page of entries and the cursor (an id) after its last entry, None on the last page."""
    async with engine.connect() as conn:
        rows = await repo.list_entries(
            conn,
            filters=filters,
            after_id=after_id,
            before_id=before_id,
            newest_first=order == "newest",
            limit=limit + 1,
        )
    more = len(rows) > limit
    rows = rows[:limit]
    return [_read(r) for r in rows], (rows[-1].id if more else None)


async def export_audit(
    engine: AsyncEngine,
    *,
    filters: AuditFilter,
    after_id: int | None,
    before_id: int | None,
    order: Order,
    limit: int | None,
) -> AsyncIterator[bytes]:
    """Matching entries as JSON lines, read in batches, at most `limit` (None: all)."""
    left = limit
    async with engine.connect() as conn:
        async for batch in repo.iter_entries(
            conn,
            filters=filters,
            after_id=after_id,
            before_id=before_id,
            newest_first=order == "newest",
            batch_size=EXPORT_BATCH_SIZE,
        ):
            if left is not None:
                batch = batch[:left]
                left -= len(batch)
            yield b"".join(orjson.dumps(_read(row).model_dump(mode="json")) + b"\n" for row in batch)
            if left == 0:
                return
