"""Running Alembic from the service (the CLI's `migrate`, readiness, tests)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

import migrations

MIGRATIONS_DIR = Path(migrations.__file__).parent


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Percent signs in URLs (encoded passwords) would be read as interpolation by ConfigParser.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at `url` to `revision`. Must not be called from a running event loop."""
    command.upgrade(alembic_config(url), revision)


def head() -> str | None:
    return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()


@cache
def known_revisions() -> frozenset[str]:
    """Every revision this code's migrations define (a database at any other one is ahead of it)."""
    return frozenset(script.revision for script in ScriptDirectory(str(MIGRATIONS_DIR)).walk_revisions())


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)
