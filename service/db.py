"""The async engine, set up per backend.

SQLite: WAL with synchronous=FULL (a 202 means the event survives a power cut), a busy timeout,
foreign keys on, and `BEGIN IMMEDIATE` for write transactions so that concurrent writers queue on
the lock instead of failing to upgrade a read lock. PostgreSQL: asyncpg with a fixed pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

# Execution option that marks a connection's next transaction as a writer (SQLite only).
WRITE = {"leadscore_write": True}
# Execution option of the ingest writer's PostgreSQL connection (AUTOCOMMIT to SQLAlchemy): its
# batch transactions are begun by `lock_names` and committed by the writer, both on the driver.
DRIVER_TRANSACTION = "leadscore_driver_transaction"


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An async engine for `url`; nothing connects until first use."""
    if is_sqlite(url):
        engine = create_async_engine(url, connect_args={"timeout": 30}, json_serializer=_json)
        _configure_sqlite(engine)
        return engine
    return create_async_engine(
        url,
        json_serializer=_json,
        json_deserializer=orjson.loads,
        connect_args={
            "timeout": 10,
            # PostgreSQL switches a prepared statement to a generic plan after five runs, and for
            # several of the ingest statements (array parameters) the generic plan scans instead of
            # looking rows up: an identity lookup took 12 ms instead of 0.3 ms per batch, and
            # allowing generic plans for the current statements doubled PostgreSQL's CPU per event.
            "server_settings": {"plan_cache_mode": "force_custom_plan"},
        },
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=False,
        pool_recycle=1800,
    )


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us issue BEGIN ourselves (the driver's implicit BEGIN is deferred).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(conn: Any) -> None:
        write = conn.get_execution_options().get("leadscore_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


async def writer_connection(engine: AsyncEngine) -> AsyncConnection:
    """A connection whose transactions take the write lock up front on SQLite."""
    conn = await engine.connect()
    return await conn.execution_options(**WRITE)


@asynccontextmanager
async def write_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A transaction that will write: on SQLite it takes the write lock at BEGIN (IMMEDIATE), so a
    read-then-write inside it (an audit append reads the chain's head) cannot lose a race with
    another writer. Commits on exit, rolls back on an exception."""
    async with engine.connect() as conn:
        await conn.execution_options(**WRITE)
        async with conn.begin():
            yield conn
