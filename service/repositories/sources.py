"""Webhook sources and their signing secrets."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncConnection

from service.repositories.tables import source, source_api_token, source_secret
from service.webhooks.base import DEFAULT_CONFIG, SourceConfig


@dataclass(frozen=True)
class SourceRow:
    id: int
    name: str
    scheme: str
    enabled: bool
    secrets: tuple[str, ...]
    created_at: dt.datetime
    config: SourceConfig = field(default=DEFAULT_CONFIG)
    # The vendor API token enrichment fetches records with (HubSpot), if one is set.
    api_token: SecretStr | None = None


async def get_source(conn: AsyncConnection, name: str) -> SourceRow | None:
    """A source with its live (not retired) secrets, newest first, and its API token."""
    return await _source_row(conn, source.c.name == name)


async def get_source_by_id(conn: AsyncConnection, source_id: int) -> SourceRow | None:
    return await _source_row(conn, source.c.id == source_id)


async def _source_row(conn: AsyncConnection, where: sa.ColumnElement[bool]) -> SourceRow | None:
    row = (await conn.execute(sa.select(source).where(where))).one_or_none()
    if row is None:
        return None
    secrets = (
        await conn.execute(
            sa.select(source_secret.c.secret)
            .where(source_secret.c.source_id == row.id, source_secret.c.retired_at.is_(None))
            .order_by(source_secret.c.id.desc())
        )
    ).scalars()
    token = (
        await conn.execute(sa.select(source_api_token.c.token).where(source_api_token.c.source_id == row.id))
    ).scalar_one_or_none()
    return SourceRow(
        row.id,
        row.name,
        row.scheme,
        row.enabled,
        tuple(secrets),
        row.created_at,
        SourceConfig.model_validate(row.config or {}),
        None if token is None else SecretStr(token),
    )


async def list_sources(conn: AsyncConnection) -> list[SourceRow]:
    names = (await conn.execute(sa.select(source.c.name).order_by(source.c.name))).scalars().all()
    rows = [await get_source(conn, name) for name in names]
    return [row for row in rows if row is not None]


async def create_source(
    conn: AsyncConnection,
    *,
    name: str,
    scheme: str,
    secret: str,
    now: dt.datetime,
    config: dict[str, Any] | None = None,
) -> int:
    source_id: int = (
        await conn.execute(
            source.insert()
            .values(name=name, scheme=scheme, enabled=True, config=config or {}, created_at=now)
            .returning(source.c.id)
        )
    ).scalar_one()
    await add_secret(conn, source_id=source_id, secret=secret, now=now)
    return source_id


async def add_secret(conn: AsyncConnection, *, source_id: int, secret: str, now: dt.datetime) -> None:
    await conn.execute(source_secret.insert().values(source_id=source_id, secret=secret, created_at=now))


async def retire_old_secrets(conn: AsyncConnection, *, source_id: int, now: dt.datetime) -> int:
    """Retire every live secret but the newest; returns how many were retired."""
    newest = (
        await conn.execute(
            sa.select(sa.func.max(source_secret.c.id)).where(
                source_secret.c.source_id == source_id, source_secret.c.retired_at.is_(None)
            )
        )
    ).scalar_one()
    if newest is None:
        return 0
    result = await conn.execute(
        source_secret.update()
        .where(
            source_secret.c.source_id == source_id,
            source_secret.c.retired_at.is_(None),
            source_secret.c.id != newest,
        )
        .values(retired_at=now)
    )
    return result.rowcount


async def set_enabled(conn: AsyncConnection, *, source_id: int, enabled: bool) -> None:
    await conn.execute(source.update().where(source.c.id == source_id).values(enabled=enabled))


async def set_config(conn: AsyncConnection, *, source_id: int, config: dict[str, Any]) -> None:
    await conn.execute(source.update().where(source.c.id == source_id).values(config=config))


async def set_api_token(conn: AsyncConnection, *, source_id: int, token: str, now: dt.datetime) -> None:
    """Set (or replace) the source's API token."""
    await clear_api_token(conn, source_id=source_id)
    await conn.execute(source_api_token.insert().values(source_id=source_id, token=token, created_at=now))


async def clear_api_token(conn: AsyncConnection, *, source_id: int) -> None:
    await conn.execute(source_api_token.delete().where(source_api_token.c.source_id == source_id))
