"""Routing rules versions and activations, pool member counters, assignments and account owners."""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from scoring.routing import AccountKey, MemberState
from service.repositories.ingest import bulk_insert, driver, in_list, lock_key, lock_names
from service.repositories.tables import (
    account_owner,
    assignment,
    lead,
    lead_identity,
    routing_activation,
    routing_pool_member,
    routing_rules_version,
)

# --- versions ----------------------------------------------------------------------------------------


async def insert_version(
    conn: AsyncConnection, *, name: str, spec: dict[str, Any], spec_sha256: str, created_by: str, now: dt.datetime
) -> int:
    version_id: int = (
        await conn.execute(
            routing_rules_version.insert()
            .values(name=name, spec=spec, spec_sha256=spec_sha256, created_by=created_by, created_at=now)
            .returning(routing_rules_version.c.id)
        )
    ).scalar_one()
    return version_id


async def get_version(conn: AsyncConnection, version_id: int) -> dict[str, Any] | None:
    row = (
        await conn.execute(sa.select(routing_rules_version).where(routing_rules_version.c.id == version_id))
    ).one_or_none()
    return dict(row._mapping) if row is not None else None


async def list_versions(conn: AsyncConnection) -> list[dict[str, Any]]:
    rows = await conn.execute(sa.select(routing_rules_version).order_by(routing_rules_version.c.id))
    return [dict(r._mapping) for r in rows]


async def list_activations(conn: AsyncConnection) -> list[dict[str, Any]]:
    """Every activation, oldest first."""
    rows = await conn.execute(sa.select(routing_activation).order_by(routing_activation.c.id))
    return [dict(r._mapping) for r in rows]


_ACTIVE = (
    sa.select(routing_activation.c.version_id, routing_rules_version.c.spec_sha256)
    .join(routing_rules_version, routing_rules_version.c.id == routing_activation.c.version_id)
    .order_by(routing_activation.c.id.desc())
    .limit(1)
)


async def active_version(conn: AsyncConnection) -> tuple[int, str] | None:
    """`(version id, spec sha256)` of the latest activation, or None before any."""
    row = (await conn.execute(_ACTIVE)).one_or_none()
    return (int(row[0]), str(row[1])) if row is not None else None


async def version_digest(conn: AsyncConnection, version_id: int) -> str | None:
    """A version's spec sha256, or None when there is no such version."""
    query = sa.select(routing_rules_version.c.spec_sha256).where(routing_rules_version.c.id == version_id)
    value = (await conn.execute(query)).scalar_one_or_none()
    return str(value) if value is not None else None


async def version_with_digest(conn: AsyncConnection, spec_sha256: str) -> int | None:
    """The newest version whose spec has this sha256, or None."""
    query = sa.select(sa.func.max(routing_rules_version.c.id)).where(routing_rules_version.c.spec_sha256 == spec_sha256)
    value = (await conn.execute(query)).scalar_one_or_none()
    return int(value) if value is not None else None


async def ever_activated(conn: AsyncConnection) -> set[int]:
    """Every version that has been active."""
    return {int(r[0]) for r in await conn.execute(sa.select(routing_activation.c.version_id).distinct())}


async def insert_activation(conn: AsyncConnection, *, version_id: int, actor: str, now: dt.datetime) -> None:
    await conn.execute(routing_activation.insert().values(version_id=version_id, activated_at=now, activated_by=actor))


# --- pool counters -----------------------------------------------------------------------------------


async def ensure_pool_members(conn: AsyncConnection, keys: Sequence[tuple[str, str]], now: dt.datetime) -> None:
    """Create missing counter rows (fresh) for `(pool_id, owner_id)` keys, in sorted order, so that
    concurrent creators of the same rows wait on each other in one order and never deadlock."""
    rows = [
        {
            "pool_id": pool_id,
            "owner_id": owner_id,
            "last_turn": 0,
            "current_weight": 0,
            "window_start": None,
            "window_count": 0,
            "assigned_total": 0,
            "updated_at": now,
        }
        for pool_id, owner_id in sorted(set(keys))
    ]
    await bulk_insert(conn, routing_pool_member, rows, ignore_conflicts=True)


@functools.cache
def _pool_members(dialect: str, lock: bool) -> sa.Select[Any]:
    query = (
        sa.select(routing_pool_member)
        .where(in_list(routing_pool_member.c.pool_id, "pool_ids", dialect))
        .order_by(routing_pool_member.c.pool_id, routing_pool_member.c.owner_id)
    )
    # PostgreSQL locks the rows in the ORDER BY order (the lock is taken above the sort), so every
    # transaction takes a pool's rows in one order. SQLite has one writer at a time: no row locks.
    return query.with_for_update() if lock and dialect == "postgresql" else query


async def pool_states(
    conn: AsyncConnection, pool_ids: Sequence[str], *, lock: bool
) -> dict[str, dict[str, MemberState]]:
    """The counters of every member row of the pools (`lock`: `FOR UPDATE` on PostgreSQL)."""
    out: dict[str, dict[str, MemberState]] = {pool_id: {} for pool_id in pool_ids}
    if not pool_ids:
        return out
    rows = await conn.execute(_pool_members(conn.dialect.name, lock), {"pool_ids": sorted(set(pool_ids))})
    for row in rows:
        out[row.pool_id][row.owner_id] = MemberState(
            last_turn=row.last_turn,
            current_weight=row.current_weight,
            window_start=row.window_start,
            window_count=row.window_count,
            assigned_total=row.assigned_total,
        )
    return out


_PG_UPDATE_MEMBERS = (
    "UPDATE routing_pool_member AS m SET last_turn = u.last_turn, current_weight = u.current_weight, "
    "window_start = u.window_start, window_count = u.window_count, assigned_total = u.assigned_total, "
    "updated_at = $8 "
    "FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::timestamptz[], $6::int[], $7::bigint[]) "
    "AS u(pool_id, owner_id, last_turn, current_weight, window_start, window_count, assigned_total) "
    "WHERE m.pool_id = u.pool_id AND m.owner_id = u.owner_id"
)
_UPDATE_MEMBER = (
    routing_pool_member.update()
    .where(
        routing_pool_member.c.pool_id == sa.bindparam("b_pool_id"),
        routing_pool_member.c.owner_id == sa.bindparam("b_owner_id"),
    )
    .values(
        last_turn=sa.bindparam("b_last_turn"),
        current_weight=sa.bindparam("b_current_weight"),
        window_start=sa.bindparam("b_window_start"),
        window_count=sa.bindparam("b_window_count"),
        assigned_total=sa.bindparam("b_assigned_total"),
        updated_at=sa.bindparam("b_now"),
    )
)


async def update_pool_members(
    conn: AsyncConnection, states: Mapping[tuple[str, str], MemberState], now: dt.datetime
) -> None:
    """Write counters back (the rows exist and are locked by this transaction), in one statement."""
    if not states:
        return
    keys = sorted(states)
    if conn.dialect.name == "postgresql":
        raw = await driver(conn)
        await raw.execute(
            _PG_UPDATE_MEMBERS,
            [k[0] for k in keys],
            [k[1] for k in keys],
            [states[k].last_turn for k in keys],
            [states[k].current_weight for k in keys],
            [states[k].window_start for k in keys],
            [states[k].window_count for k in keys],
            [states[k].assigned_total for k in keys],
            now,
        )
        return
    await conn.execute(
        _UPDATE_MEMBER,
        [
            {
                "b_pool_id": pool_id,
                "b_owner_id": owner_id,
                "b_last_turn": states[(pool_id, owner_id)].last_turn,
                "b_current_weight": states[(pool_id, owner_id)].current_weight,
                "b_window_start": states[(pool_id, owner_id)].window_start,
                "b_window_count": states[(pool_id, owner_id)].window_count,
                "b_assigned_total": states[(pool_id, owner_id)].assigned_total,
                "b_now": now,
            }
            for pool_id, owner_id in keys
        ],
    )


async def list_pool_members(conn: AsyncConnection) -> list[dict[str, Any]]:
    rows = await conn.execute(
        sa.select(routing_pool_member).order_by(routing_pool_member.c.pool_id, routing_pool_member.c.owner_id)
    )
    return [dict(r._mapping) for r in rows]


# --- account owners ----------------------------------------------------------------------------------


async def lock_accounts(conn: AsyncConnection, keys: Sequence[AccountKey]) -> None:
    """Serialise routing of leads of the same accounts across transactions (PostgreSQL advisory
    locks, sorted), so two leads of a new account at once cannot both miss its owner."""
    await lock_names(conn, [lock_key("account", kind, key) for kind, key in keys])


_ACCOUNT_OWNERS = sa.select(account_owner.c.kind, account_owner.c.key, account_owner.c.owner_id).where(
    sa.tuple_(account_owner.c.kind, account_owner.c.key).in_(sa.bindparam("keys", expanding=True))
)


async def account_owners(conn: AsyncConnection, keys: Sequence[AccountKey]) -> dict[AccountKey, str]:
    """The owners of those accounts that have one, in one statement."""
    if not keys:
        return {}
    rows = await conn.execute(_ACCOUNT_OWNERS, {"keys": sorted(set(keys))})
    return {(row.kind, row.key): row.owner_id for row in rows}


async def claim_accounts(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    """Give accounts their first owner; an account that has one keeps it."""
    await bulk_insert(conn, account_owner, sorted(rows, key=lambda r: (r["kind"], r["key"])), ignore_conflicts=True)


async def set_account_owner(conn: AsyncConnection, *, kind: str, key: str, owner_id: str, now: dt.datetime) -> None:
    """Set (or replace) an account's owner by hand."""
    values = {"kind": kind, "key": key, "owner_id": owner_id, "source": "ops", "assignment_id": None, "updated_at": now}
    changes = {"owner_id": owner_id, "source": "ops", "assignment_id": None, "updated_at": now}
    keys = [account_owner.c.kind, account_owner.c.key]
    statement: sa.Executable
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        statement = pg_insert(account_owner).values(**values).on_conflict_do_update(index_elements=keys, set_=changes)
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        statement = (
            sqlite_insert(account_owner).values(**values).on_conflict_do_update(index_elements=keys, set_=changes)
        )
    await conn.execute(statement)


async def delete_account_owner(conn: AsyncConnection, *, kind: str, key: str) -> bool:
    result = await conn.execute(account_owner.delete().where(account_owner.c.kind == kind, account_owner.c.key == key))
    return bool(result.rowcount)


async def list_account_owners(conn: AsyncConnection) -> list[dict[str, Any]]:
    rows = await conn.execute(sa.select(account_owner).order_by(account_owner.c.kind, account_owner.c.key))
    return [dict(r._mapping) for r in rows]


# --- assignments ---------------------------------------------------------------------------------------


async def insert_assignments(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    await bulk_insert(conn, assignment, rows)


@functools.cache
def _current(dialect: str) -> sa.Select[Any]:
    ranked = (
        sa.select(
            assignment,
            sa.func.row_number()
            .over(partition_by=assignment.c.lead_id, order_by=(assignment.c.assigned_at.desc(), assignment.c.id.desc()))
            .label("rn"),
        )
        .where(in_list(assignment.c.lead_id, "lead_ids", dialect))
        .subquery()
    )
    return sa.select(ranked).where(ranked.c.rn == 1)


async def latest_assignment(conn: AsyncConnection, lead_ids: Sequence[uuid.UUID]) -> dict[str, Any] | None:
    """The most recent assignment of any of these leads (a lead and the leads merged into it)."""
    if not lead_ids:
        return None
    rows = await conn.execute(_current(conn.dialect.name), {"lead_ids": list(dict.fromkeys(lead_ids))})
    found = [{k: v for k, v in row._mapping.items() if k != "rn"} for row in rows]
    return max(found, key=lambda r: (r["assigned_at"], r["id"]), default=None)


async def count_assignments(conn: AsyncConnection, *, routing_version_id: int | None = None) -> dict[str, int]:
    """Assignments per owner (queue assignments under `queue:<name>`)."""
    label = sa.func.coalesce(assignment.c.owner_id, sa.literal("queue:") + sa.func.coalesce(assignment.c.queue, ""))
    query = sa.select(label.label("who"), sa.func.count()).group_by(label)
    if routing_version_id is not None:
        query = query.where(assignment.c.routing_version_id == routing_version_id)
    return {str(row[0]): int(row[1]) for row in await conn.execute(query)}


def _routed_page(after: bool) -> sa.Select[Any]:
    ranked = (
        sa.select(
            assignment,
            sa.func.row_number()
            .over(partition_by=assignment.c.lead_id, order_by=(assignment.c.assigned_at.desc(), assignment.c.id.desc()))
            .label("rn"),
        )
        .where(assignment.c.assigned_at >= sa.bindparam("since"))
        .subquery()
    )
    query = (
        sa.select(
            ranked.c.lead_id,
            ranked.c.kind,
            ranked.c.owner_id,
            ranked.c.pool_id,
            ranked.c.queue,
            lead.c.stage,
            lead.c.traits,
        )
        .join(lead, lead.c.id == ranked.c.lead_id)
        .where(ranked.c.rn == 1, lead.c.merged_into_id.is_(None))
    )
    if after:
        query = query.where(ranked.c.lead_id > sa.bindparam("after"))
    return query.order_by(ranked.c.lead_id).limit(sa.bindparam("limit"))


_ROUTED_FIRST = _routed_page(after=False)
_ROUTED_AFTER = _routed_page(after=True)


async def routed_leads_page(
    conn: AsyncConnection, *, since: dt.datetime, after: uuid.UUID | None, limit: int
) -> list[dict[str, Any]]:
    """Live leads assigned since `since`, in id order after `after`: each with its latest
    assignment (kind, owner_id, pool_id, queue) and its stage and traits."""
    query, params = (_ROUTED_FIRST, {}) if after is None else (_ROUTED_AFTER, {"after": after})
    rows = await conn.execute(query, {"since": since, "limit": limit, **params})
    return [dict(r._mapping) for r in rows]


# --- leads -----------------------------------------------------------------------------------------------


@functools.cache
def _emails(dialect: str) -> sa.Select[Any]:
    return (
        sa.select(lead_identity.c.lead_id, lead_identity.c.value)
        .where(in_list(lead_identity.c.lead_id, "lead_ids", dialect), lead_identity.c.namespace == "email")
        .order_by(lead_identity.c.lead_id, lead_identity.c.id)
    )


async def lead_emails(conn: AsyncConnection, lead_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[str]]:
    """Each lead's email identities, oldest first, in one statement."""
    out: dict[uuid.UUID, list[str]] = {}
    if not lead_ids:
        return out
    for row in await conn.execute(_emails(conn.dialect.name), {"lead_ids": list(dict.fromkeys(lead_ids))}):
        out.setdefault(row.lead_id, []).append(row.value)
    return out
