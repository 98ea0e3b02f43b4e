"""`leadscore`: the ops command line."""

from __future__ import annotations

import asyncio
import datetime as dt
import getpass
import json
import os
import shutil
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import uvicorn
from sqlalchemy.ext.asyncio import AsyncEngine

from service import migrate as migrations
from service.auth import ROLES, create_key
from service.db import create_engine
from service.errors import LeadscoreError
from service.logging import configure_logging
from service.repositories import keys as keys_repo
from service.settings import Settings
from service.sources import (
    SourceError,
    add_source,
    enable_source,
    list_all,
    retire_source_secrets,
    rotate_source,
)

T = TypeVar("T")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def _with_engine(fn: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    async def run() -> T:
        engine = create_engine(Settings().database_url, pool_size=1)
        try:
            return await fn(engine)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(run())
    except (SourceError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except LeadscoreError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc.detail}") from None


@click.group()
def main() -> None:
    """Leadscore: lead scoring and routing. Settings come from LEADSCORE_* variables."""
    settings = Settings()
    configure_logging(level=settings.log_level, fmt=settings.log_format)


@main.command()
@click.option("--revision", default="head", show_default=True)
def migrate(revision: str) -> None:
    """Bring the database schema to the latest migration."""
    url = Settings().database_url
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    migrations.upgrade(url, revision)
    click.echo(f"database at {revision}", err=True)


@main.command()
@click.option("--host", default=None, help="Default: LEADSCORE_HOST.")
@click.option("--port", type=int, default=None, help="Default: LEADSCORE_PORT.")
@click.option("--workers", type=int, default=None, help="Default: LEADSCORE_WORKERS.")
@click.option("--dev/--no-dev", default=None, help="Dev mode (demo source and ops key). Default: LEADSCORE_DEV_MODE.")
@click.option("--access-log/--no-access-log", default=False, show_default=True)
def serve(host: str | None, port: int | None, workers: int | None, dev: bool | None, access_log: bool) -> None:
    """Run the HTTP service (migrations are a separate step: `leadscore migrate`)."""
    settings = Settings()
    host = host or settings.host
    port = port or settings.port
    workers = workers or settings.workers
    if dev is not None:
        os.environ["LEADSCORE_DEV_MODE"] = "true" if dev else "false"
        settings = Settings()
    if settings.dev_mode:
        from service.dev import bootstrap

        _with_engine(lambda engine: bootstrap(engine, settings=settings, base_url=f"http://{host}:{port}"))
    if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Each worker writes its metrics here so /metrics can add them up.
        metrics_dir = settings.var_dir / "prometheus"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir.resolve())
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        access_log=access_log,
        log_level=settings.log_level.lower(),
        proxy_headers=True,
    )


@main.group()
def sources() -> None:
    """Webhook sources and their signing secrets."""


@sources.command("add")
@click.argument("name")
@click.option("--scheme", default="standard", show_default=True, help="Signature scheme.")
def sources_add(name: str, scheme: str) -> None:
    """Create a source; prints its secret once, as JSON."""
    created = _with_engine(lambda e: add_source(e, name=name, scheme=scheme, now=_now()))
    _print_json({"name": created.name, "scheme": created.scheme, "secret": created.secret})


@sources.command("list")
def sources_list() -> None:
    """List sources (never their secrets)."""
    rows = _with_engine(list_all)
    _print_json(
        [{"name": r.name, "scheme": r.scheme, "enabled": r.enabled, "live_secrets": len(r.secrets)} for r in rows]
    )


@sources.command("rotate")
@click.argument("name")
def sources_rotate(name: str) -> None:
    """Add a new secret; the old one stays valid until `sources retire`. Prints the new secret."""
    created = _with_engine(lambda e: rotate_source(e, name=name, now=_now()))
    _print_json({"name": created.name, "scheme": created.scheme, "secret": created.secret})


@sources.command("retire")
@click.argument("name")
def sources_retire(name: str) -> None:
    """Retire every secret of the source but the newest."""
    count = _with_engine(lambda e: retire_source_secrets(e, name=name, now=_now()))
    _print_json({"name": name, "retired": count})


@sources.command("disable")
@click.argument("name")
def sources_disable(name: str) -> None:
    """Stop accepting the source's requests (answered 404, nothing stored); its secrets are kept."""
    _with_engine(lambda e: enable_source(e, name=name, enabled=False))
    _print_json({"name": name, "enabled": False})


@sources.command("enable")
@click.argument("name")
def sources_enable(name: str) -> None:
    """Accept the source's requests again."""
    _with_engine(lambda e: enable_source(e, name=name, enabled=True))
    _print_json({"name": name, "enabled": True})


@main.group()
def keys() -> None:
    """API keys for the HTTP API."""


@keys.command("create")
@click.option("--role", type=click.Choice(ROLES), required=True)
@click.option("--name", required=True)
@click.option("--expires-in-days", type=int, default=None)
def keys_create(role: str, name: str, expires_in_days: int | None) -> None:
    """Create a key; prints it once, as JSON (only its hash is stored)."""
    now = _now()
    expires = now + dt.timedelta(days=expires_in_days) if expires_in_days else None
    created = _with_engine(
        lambda e: create_key(e, name=name, role="ops" if role == "ops" else "viewer", now=now, expires_at=expires)
    )
    _print_json(
        {
            "id": created.id,
            "name": created.name,
            "role": created.role,
            "key": created.key,
            "expires_at": created.expires_at,
        }
    )


@keys.command("list")
def keys_list() -> None:
    """List keys (their prefixes, never the keys)."""

    async def run(engine: AsyncEngine) -> list[keys_repo.ApiKeyRow]:
        async with engine.connect() as conn:
            return await keys_repo.list_keys(conn)

    _print_json([vars(k) for k in _with_engine(run)])


@keys.command("revoke")
@click.argument("key_id", type=int)
def keys_revoke(key_id: int) -> None:
    """Revoke a key by id; it stops working at once."""

    async def run(engine: AsyncEngine) -> bool:
        async with engine.begin() as conn:
            return await keys_repo.revoke_key(conn, key_id=key_id, now=_now())

    if not _with_engine(run):
        raise click.ClickException(f"no live key with id {key_id}")
    _print_json({"id": key_id, "revoked": True})


@main.command()
@click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--label", required=True, help="The 0/1 outcome column, e.g. Converted.")
@click.option("--activate", is_flag=True, help="Make the new version the active one.")
def train(spec_path: Path, data_path: Path, label: str, activate: bool) -> None:
    """Train a pipeline spec on a labelled CSV and register it as a new immutable version."""
    from service.pipelines import InvalidPipeline, parse_spec, read_training_csv, train_and_register

    spec_text = spec_path.read_text()
    try:
        parse_spec(spec_text)  # fail before reading a large file
        rows, labels, digest = read_training_csv(data_path, label)
    except InvalidPipeline as exc:
        raise click.ClickException(f"invalid spec {spec_path}: {json.dumps(exc.detail, default=str)}") from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"training on {len(rows)} rows of {data_path.name} (sha256 {digest[:12]}...)", err=True)

    def progress(stage: str, fraction: float) -> None:
        click.echo(f"  [{fraction:4.0%}] {stage}", err=True)

    registered = _with_engine(
        lambda e: train_and_register(
            e,
            spec_text=spec_text,
            rows=rows,
            labels=labels,
            data_sha256=digest,
            activate=activate,
            actor=f"cli:{getpass.getuser()}",
            progress=progress,
        )
    )
    _print_json({"version": registered.version_id, "activated": registered.activated, "metrics": registered.metrics})


@main.command("score")
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--pipeline", "version", type=int, default=None, help="Default: the active version.")
@click.option("--id-column", default=None, help="Input column copied to the output (default: the first column).")
@click.option("--chunk-size", type=int, default=10_000, show_default=True)
def score_file(data_path: Path, out_path: Path, version: int | None, id_column: str | None, chunk_size: int) -> None:
    """Score a CSV of leads in bulk: id, probability, score, grade and top reasons per row."""
    import csv

    from service.pipelines import load_version

    pipeline, _ = _with_engine(lambda e: load_version(e, version))
    with data_path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise click.ClickException(f"{data_path} has no rows")
    id_column = id_column or next(iter(rows[0]))
    if id_column not in rows[0]:
        raise click.ClickException(f"{data_path} has no column {id_column!r}")
    now = _now()
    with (
        out_path.open("w", newline="") as out,
        click.progressbar(length=len(rows), label="scoring", file=sys.stderr) as bar,
    ):
        writer = csv.writer(out)
        writer.writerow([id_column, "probability", "score", "grade", "top_reasons_up", "top_reasons_down", "rules"])
        for start in range(0, len(rows), chunk_size):
            chunk = rows[start : start + chunk_size]
            scores = pipeline.compiled.score_batch(chunk, now=now)
            for i, row in enumerate(chunk):
                reasons = scores.reasons(i)
                writer.writerow(
                    [
                        row[id_column],
                        f"{scores.probability[i]:.6f}",
                        f"{scores.value[i]:.2f}",
                        scores.grade[i],
                        ";".join(reasons["features_up"]),
                        ";".join(reasons["features_down"]),
                        ";".join(reasons["rules"]),
                    ]
                )
            bar.update(len(chunk))
    click.echo(f"scored {len(rows)} rows with pipeline version {pipeline.version_id} into {out_path}", err=True)


@main.command()
@click.option("--pipeline", "version", type=int, default=None, help="Default: the active version.")
@click.option("--batch-size", type=int, default=500, show_default=True)
def rescore(version: int | None, batch_size: int) -> None:
    """Re-score stored leads with a version, in resumable batches; nothing downstream is triggered."""
    from service.pipelines import rescore_leads

    settings = Settings()
    done = _with_engine(
        lambda e: rescore_leads(
            e,
            version_id=version,
            batch_size=batch_size,
            lookback=dt.timedelta(days=settings.activity_lookback_days),
            progress=lambda n: click.echo(f"  re-scored {n} more leads", err=True),
        )
    )
    _print_json({"rescored": done})


@main.group()
def pipelines() -> None:
    """Pipeline versions: list them, choose the active and the shadow one."""


@pipelines.command("list")
def pipelines_list() -> None:
    """Every version with its headline metrics."""
    from service.pipelines import list_pipelines

    _print_json([p.model_dump(mode="json") for p in _with_engine(list_pipelines)])


@pipelines.command("activate")
@click.argument("version", type=int)
def pipelines_activate(version: int) -> None:
    """Make a version the active one (it scores, and its scores are the leads' current scores)."""
    from service.pipelines import assign_slot

    _with_engine(lambda e: assign_slot(e, slot="active", version_id=version, actor=f"cli:{getpass.getuser()}"))
    _print_json({"active": version})


@pipelines.command("shadow")
@click.argument("version", type=int, required=False)
@click.option("--clear", is_flag=True, help="Stop shadow scoring.")
def pipelines_shadow(version: int | None, clear: bool) -> None:
    """Score every lead with VERSION too, stored apart, changing nothing else."""
    from service.pipelines import assign_slot

    if (version is None) == (not clear):
        raise click.UsageError("give a VERSION or --clear")
    _with_engine(lambda e: assign_slot(e, slot="shadow", version_id=version, actor=f"cli:{getpass.getuser()}"))
    _print_json({"shadow": version})


@main.group()
def routing() -> None:
    """Routing rules versions, pool counters and account owners."""


@routing.command("load")
@click.argument("spec_path", metavar="FILE", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--activate", is_flag=True, help="Make the new version the active one.")
def routing_load(spec_path: Path, activate: bool) -> None:
    """Validate a routing spec (YAML) and store it as a new immutable version."""
    from service.routing import InvalidRoutingSpec, create_version, parse_routing_spec

    try:
        spec = parse_routing_spec(spec_path.read_text())
    except InvalidRoutingSpec as exc:
        raise click.ClickException(f"invalid routing spec {spec_path}: {json.dumps(exc.detail)}") from None
    actor = f"cli:{getpass.getuser()}"
    version = _with_engine(lambda e: create_version(e, spec, actor=actor, activate=activate, now=_now()))
    _print_json({"version": version, "name": spec.name, "activated": activate})


@routing.command("list")
def routing_list() -> None:
    """Every routing rules version (without specs), which is active, and the activations."""
    from service.routing import list_versions

    listed = _with_engine(list_versions).model_dump(mode="json", exclude={"versions": {"__all__": {"spec"}}})
    _print_json(listed)


@routing.command("activate")
@click.argument("version", type=int)
def routing_activate(version: int) -> None:
    """Make a stored version the active one."""
    from service.routing import activate_version

    _with_engine(lambda e: activate_version(e, version, actor=f"cli:{getpass.getuser()}", now=_now()))
    _print_json({"active": version})


@routing.command("pools")
def routing_pools() -> None:
    """Every pool member's counters (turn, smooth-weight state, leads in the current window, total)."""
    from service.routing import list_pool_counters

    _print_json(_with_engine(list_pool_counters))


@routing.group("accounts")
def routing_accounts() -> None:
    """Account owners: leads of an account (email domain or company id) go to its owner."""


_ACCOUNT_KIND = click.Choice(["domain", "company"])


@routing_accounts.command("list")
def routing_accounts_list() -> None:
    """Every account with an owner, and whether ops set it or an assignment claimed it."""
    from service.routing import list_account_owners

    _print_json(_with_engine(list_account_owners))


@routing_accounts.command("set")
@click.argument("kind", type=_ACCOUNT_KIND)
@click.argument("key")
@click.argument("owner_id")
def routing_accounts_set(kind: str, key: str, owner_id: str) -> None:
    """Give an account (KIND domain|company, KEY acme.io or a company id) to OWNER_ID."""
    from service.routing import set_account_owner

    _with_engine(lambda e: set_account_owner(e, kind=kind, key=key, owner_id=owner_id, now=_now()))
    _print_json({"kind": kind, "key": key, "owner_id": owner_id})


@routing_accounts.command("remove")
@click.argument("kind", type=_ACCOUNT_KIND)
@click.argument("key")
def routing_accounts_remove(kind: str, key: str) -> None:
    """Forget an account's owner (its next routed lead may claim it again)."""
    from service.routing import remove_account_owner

    if not _with_engine(lambda e: remove_account_owner(e, kind=kind, key=key)):
        raise click.ClickException(f"no owner for {kind} {key!r}")
    _print_json({"kind": kind, "key": key, "removed": True})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
