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

from service import console
from service import migrate as migrations
from service.auth import ROLES, Principal, create_key, list_keys, revoke_key
from service.change_schemas import ChangeRequestRead
from service.db import create_engine
from service.errors import LeadscoreError
from service.logging import configure_logging
from service.settings import Settings
from service.sources import (
    SourceError,
    add_source,
    configure_source,
    enable_source,
    list_all,
    retire_source_secrets,
    rotate_source,
    source_config,
)
from service.training_data import DEFAULT_POSITIVE, POSITIVE_KINDS
from service.webhooks import SCHEMES

T = TypeVar("T")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _actor() -> Principal:
    """Who runs this command, for the audit log: the OS user, with the ops role (whoever can run
    the CLI against the database can change anything anyway)."""
    user = getpass.getuser()
    return Principal(subject=f"cli:{user}", role="ops", name=user)


_reason = click.option("--reason", default=None, help="Why, for the audit log.")


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
@click.pass_context
def main(ctx: click.Context) -> None:
    """Leadscore: lead scoring and routing. Settings come from LEADSCORE_* variables."""
    if ctx.invoked_subcommand != "worker":
        # Only the worker honours a stop asked for while the process was starting (service.console).
        console.release()
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


def _read_mapping(path: Path) -> dict[str, Any]:
    """A field mapping file: a YAML or JSON object of vendor property -> canonical trait (null drops)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise click.ClickException(f"cannot read the mapping {path}: {exc}") from None
    if not isinstance(data, dict):
        raise click.ClickException(f"the mapping {path} is not an object of vendor property -> trait")
    return data


def _read_secret(from_stdin: bool) -> str | None:
    # From stdin, never an argument: arguments end up in shell history and process listings.
    return sys.stdin.readline().rstrip("\r\n") if from_stdin else None


def _versions(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


_MAPPING = click.option(
    "--mapping",
    "mapping_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="YAML/JSON file: vendor property -> canonical trait (null drops the property).",
)
_SECRET_STDIN = click.option(
    "--secret-stdin",
    is_flag=True,
    help="Read the secret from stdin instead of making one (HubSpot: the app's client secret; required).",
)
_VERSIONS = click.option(
    "--signature-versions",
    default=None,
    help="HubSpot: accepted signature versions, comma-separated (default v3; v1 and v2 have no timestamp).",
)


@sources.command("add")
@click.argument("name")
@click.option("--scheme", default="standard", show_default=True, help=f"One of: {', '.join(sorted(SCHEMES))}.")
@_MAPPING
@_SECRET_STDIN
@_VERSIONS
@_reason
def sources_add(
    name: str,
    scheme: str,
    mapping_path: Path | None,
    secret_stdin: bool,
    signature_versions: str | None,
    reason: str | None,
) -> None:
    """Create a source; prints its secret once, as JSON."""
    mapping = _read_mapping(mapping_path) if mapping_path else None
    try:
        config = source_config(mapping=mapping, signature_versions=_versions(signature_versions))
    except SourceError as exc:
        raise click.ClickException(str(exc)) from None
    secret = _read_secret(secret_stdin)
    created = _with_engine(
        lambda e: add_source(
            e, name=name, scheme=scheme, now=_now(), secret=secret, config=config, actor=_actor(), reason=reason
        )
    )
    _print_json({"name": created.name, "scheme": created.scheme, "secret": created.secret})


@sources.command("configure")
@click.argument("name")
@_MAPPING
@click.option("--clear-mapping", is_flag=True, help="Remove the field mapping (vendor names are kept as they come).")
@_VERSIONS
@click.option(
    "--api-token-stdin",
    is_flag=True,
    help="HubSpot: read a private-app token (scope crm.objects.contacts.read) from stdin; turns enrichment on.",
)
@click.option("--clear-api-token", is_flag=True, help="HubSpot: remove the API token (enrichment off).")
@click.option(
    "--properties",
    default=None,
    help="HubSpot: contact properties enrichment reads besides the defaults, comma-separated ('' for none).",
)
@click.option("--api-base-url", default=None, help="HubSpot: the API base URL (default https://api.hubapi.com).")
@_reason
def sources_configure(
    name: str,
    mapping_path: Path | None,
    clear_mapping: bool,
    signature_versions: str | None,
    api_token_stdin: bool,
    clear_api_token: bool,
    properties: str | None,
    api_base_url: str | None,
    reason: str | None,
) -> None:
    """Change a source's field mapping, accepted signature versions or enrichment; prints the
    configuration (never the token)."""
    if mapping_path and clear_mapping:
        raise click.UsageError("give --mapping or --clear-mapping, not both")
    if api_token_stdin and clear_api_token:
        raise click.UsageError("give --api-token-stdin or --clear-api-token, not both")
    mapping = {} if clear_mapping else (_read_mapping(mapping_path) if mapping_path else None)
    wanted = [p.strip() for p in properties.split(",") if p.strip()] if properties is not None else None
    if (
        mapping is None
        and signature_versions is None
        and wanted is None
        and api_base_url is None
        and not api_token_stdin
        and not clear_api_token
    ):
        raise click.UsageError(
            "nothing to change: give --mapping, --clear-mapping, --signature-versions, --api-token-stdin, "
            "--clear-api-token, --properties or --api-base-url"
        )
    token = _read_secret(api_token_stdin)
    config = _with_engine(
        lambda e: configure_source(
            e,
            name=name,
            mapping=mapping,
            signature_versions=_versions(signature_versions),
            properties=wanted,
            api_base_url=api_base_url,
            api_token=token,
            clear_api_token=clear_api_token,
            actor=_actor(),
            reason=reason,
        )
    )
    _print_json({"name": name, "config": config.model_dump(mode="json")})


@sources.command("list")
def sources_list() -> None:
    """List sources and their configuration (never their secrets; `api_token: true` when one is set)."""
    rows = _with_engine(list_all)
    _print_json(
        [
            {
                "name": r.name,
                "scheme": r.scheme,
                "enabled": r.enabled,
                "live_secrets": len(r.secrets),
                "config": r.config.model_dump(mode="json", exclude_defaults=True),
                **({"api_token": True} if r.api_token is not None else {}),
            }
            for r in rows
        ]
    )


@sources.command("rotate")
@click.argument("name")
@_SECRET_STDIN
@_reason
def sources_rotate(name: str, secret_stdin: bool, reason: str | None) -> None:
    """Add a new secret; the old one stays valid until `sources retire`. Prints the new secret."""
    secret = _read_secret(secret_stdin)
    created = _with_engine(
        lambda e: rotate_source(e, name=name, now=_now(), secret=secret, actor=_actor(), reason=reason)
    )
    _print_json({"name": created.name, "scheme": created.scheme, "secret": created.secret})


@sources.command("retire")
@click.argument("name")
@_reason
def sources_retire(name: str, reason: str | None) -> None:
    """Retire every secret of the source but the newest."""
    count = _with_engine(lambda e: retire_source_secrets(e, name=name, now=_now(), actor=_actor(), reason=reason))
    _print_json({"name": name, "retired": count})


@sources.command("disable")
@click.argument("name")
@_reason
def sources_disable(name: str, reason: str | None) -> None:
    """Stop accepting the source's requests (answered 404, nothing stored); its secrets are kept."""
    _with_engine(lambda e: enable_source(e, name=name, enabled=False, now=_now(), actor=_actor(), reason=reason))
    _print_json({"name": name, "enabled": False})


@sources.command("enable")
@click.argument("name")
@_reason
def sources_enable(name: str, reason: str | None) -> None:
    """Accept the source's requests again."""
    _with_engine(lambda e: enable_source(e, name=name, enabled=True, now=_now(), actor=_actor(), reason=reason))
    _print_json({"name": name, "enabled": True})


@main.group()
def keys() -> None:
    """API keys for the HTTP API."""


@keys.command("create")
@click.option("--role", type=click.Choice(ROLES), required=True)
@click.option("--name", required=True)
@click.option("--expires-in-days", type=click.IntRange(min=1), default=None)
@_reason
def keys_create(role: str, name: str, expires_in_days: int | None, reason: str | None) -> None:
    """Create a key; prints it once, as JSON (only its hash is stored)."""
    now = _now()
    expires = now + dt.timedelta(days=expires_in_days) if expires_in_days else None
    created = _with_engine(
        lambda e: create_key(
            e,
            name=name,
            role="ops" if role == "ops" else "viewer",
            now=now,
            expires_at=expires,
            actor=_actor(),
            reason=reason,
        )
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
    _print_json([vars(k) for k in _with_engine(list_keys)])


@keys.command("revoke")
@click.argument("key_id", type=int)
@_reason
def keys_revoke(key_id: int, reason: str | None) -> None:
    """Revoke a key by id; it stops working at once."""
    _with_engine(lambda e: revoke_key(e, key_id=key_id, now=_now(), actor=_actor(), reason=reason))
    _print_json({"id": key_id, "revoked": True})


@main.group()
def audit() -> None:
    """The audit log of key, source and change-request changes."""


@audit.command("verify")
def audit_verify() -> None:
    """Walk the hash chain; exit 1 naming the first broken link (an edited or deleted entry)."""
    from service.audit import verify_chain

    report = _with_engine(verify_chain)
    if report.ok:
        _print_json({"ok": True, "entries": report.checked, "head": {"id": report.head_id, "hash": report.head_hash}})
        return
    assert report.broken is not None
    _print_json(
        {
            "ok": False,
            "entries_verified": report.checked,
            "broken": {"entry_id": report.broken.entry_id, "problem": report.broken.problem},
        }
    )
    click.echo(f"audit chain broken at entry {report.broken.entry_id}: {report.broken.problem}", err=True)
    sys.exit(1)


@main.command()
@click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--label", required=True, help="The 0/1 outcome column, e.g. Converted.")
@click.option(
    "--activate",
    is_flag=True,
    help="Make the new version active: at once when none is active yet, else by a change request.",
)
@click.option("--reason", default=None, help="Why (the change request's reason; needed once a version is active).")
def train(spec_path: Path, data_path: Path, label: str, activate: bool, reason: str | None) -> None:
    """Train a pipeline spec on a labelled CSV (such as `leadscore outcomes export` writes) and
    register it as a new immutable version."""
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

    async def run(engine: AsyncEngine) -> dict[str, Any]:
        registered = await train_and_register(
            engine,
            spec_text=spec_text,
            rows=rows,
            labels=labels,
            data_sha256=digest,
            actor=_actor().subject,
            progress=progress,
        )
        out: dict[str, Any] = {"version": registered.version_id, "activated": False}
        if activate:
            request = await _activate(engine, registered.version_id, reason=reason)
            out.update(activated=request.status == "applied", change_request=_summary(request))
        return {**out, "metrics": registered.metrics}

    _print_json(_with_engine(run))


def _iso_time(_ctx: click.Context, param: click.Parameter, value: str | None) -> dt.datetime | None:
    """An ISO 8601 date or time (`2026-11-01`, `2026-11-01T08:00:00+01:00`); UTC if no offset."""
    if value is None:
        return None
    try:
        return _utc(dt.datetime.fromisoformat(value))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 date or time", param=param) from None


@main.group()
def outcomes() -> None:
    """CRM outcomes: export them as training labels."""


@outcomes.command("export")
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The CSV to write (replaced if it exists).",
)
@click.option(
    "--since",
    metavar="ISO-TIME",
    callback=_iso_time,
    help="Only outcomes that occurred at or after this time (UTC if no offset).",
)
@click.option("--until", metavar="ISO-TIME", callback=_iso_time, help="Only outcomes that occurred before this time.")
@click.option("--label-column", default="Converted", show_default=True, help="Name of the 0/1 column.")
@click.option(
    "--positive",
    default=",".join(DEFAULT_POSITIVE),
    show_default=True,
    help=f"Outcome kinds labelled 1, comma-separated, among {', '.join(POSITIVE_KINDS)}; `lost` is 0.",
)
def outcomes_export(
    out_path: Path, since: dt.datetime | None, until: dt.datetime | None, label_column: str, positive: str
) -> None:
    """Write a training CSV from CRM outcomes, for `leadscore train --data FILE --label COLUMN`.

    One row per live (not merged) lead with a decisive outcome: label 1 for a --positive kind,
    0 for `lost`; a lead with several takes its latest. Kinds that are neither (by default
    `accepted`) label nothing: a lead with only those has no row. Columns: lead_id, outcome_at,
    the label, then every trait the exported leads had by then (sorted, names verbatim).

    Traits are each lead's as they were before sales had it: rebuilt from its events that
    occurred before its first outcome of any kind (`accepted` too), as ingest applies them; what
    came later (CRM edits, re-sent properties) is not used. How many leads had no trait by then,
    and how many cells of each trait are empty, is reported.
    """
    import tempfile

    from service.training_data import export_training_data

    kinds = [k.strip() for k in positive.split(",") if k.strip()]
    if not out_path.parent.is_dir():
        raise click.ClickException(f"no directory {out_path.parent}")
    # Written next to the target and renamed into place, so a failed export leaves no partial
    # file; mkstemp's owner-only mode stays, which suits a file of people's details.
    fd, name = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".partial")
    partial = Path(name)
    try:
        with open(fd, "w", newline="", encoding="utf-8") as out:
            summary = _with_engine(
                lambda e: export_training_data(
                    e, out, label_column=label_column, positive=kinds, since=since, until=until
                )
            )
        partial.replace(out_path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    click.echo(
        f"exported {summary.rows} labelled leads ({summary.positive} positive, {summary.negative} negative) "
        f"with {len(summary.trait_columns)} trait columns into {out_path}",
        err=True,
    )
    click.echo(
        f"traits as before each lead's first outcome: {summary.leads_without_traits_before_outcome} leads had none, "
        f"{summary.empty_cells} trait cells are empty",
        err=True,
    )
    if summary.dropped_traits:
        click.echo(f"left out traits named like a fixed column: {', '.join(summary.dropped_traits)}", err=True)
    _print_json({"out": str(out_path), **summary.as_dict()})


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
@click.option("--reason", default=None, help="Why (needed once a version is active).")
@click.option("--apply-at", type=click.DateTime(), default=None, help="Apply at this UTC time once approved.")
@click.option("--reevaluate", is_flag=True, help="On apply, re-score and re-qualify the window's leads.")
@click.option("--trigger-downstream", is_flag=True, help="With --reevaluate: route leads that newly qualify.")
def pipelines_activate(
    version: int, reason: str | None, apply_at: dt.datetime | None, reevaluate: bool, trigger_downstream: bool
) -> None:
    """Make a version the active one: at once when none is active yet (a bootstrap change request),
    else by proposing a change request that another ops identity approves."""
    request = _with_engine(
        lambda e: _activate(
            e,
            version,
            reason=reason,
            apply_at=_utc(apply_at),
            reevaluate=reevaluate,
            trigger_downstream=trigger_downstream,
        )
    )
    _print_json(_summary(request))


@pipelines.command("shadow")
@click.argument("version", type=int, required=False)
@click.option("--clear", is_flag=True, help="Stop shadow scoring.")
@click.option("--reason", required=True, help="Why (the change request's reason).")
def pipelines_shadow(version: int | None, clear: bool, reason: str) -> None:
    """Propose scoring every lead with VERSION too, stored apart, changing nothing else (or --clear)."""
    from service.change_requests import ChangeControl, propose
    from service.change_schemas import ChangeRequestCreate, ShadowPipelineChange

    if (version is None) == (not clear):
        raise click.UsageError("give a VERSION or --clear")
    body = ChangeRequestCreate(change=ShadowPipelineChange(kind="shadow_pipeline", version=version), reason=reason)
    request = _with_engine(
        lambda e: propose(e, body, principal=_actor(), control=ChangeControl.from_settings(Settings()), now=_now())
    )
    _print_json(_summary(request))


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _summary(request: ChangeRequestRead) -> dict[str, Any]:
    fields = ("id", "kind", "status", "bootstrap", "author", "apply_at", "approved_by", "applied_at", "result")
    summary = request.model_dump(mode="json", include=set(fields))
    if request.impact is not None:
        summary["impact"] = request.impact.model_dump(mode="json", include={"leads_considered", "changes", "moves"})
    return summary


async def _activate(
    engine: AsyncEngine,
    version: int,
    *,
    reason: str | None,
    apply_at: dt.datetime | None = None,
    reevaluate: bool = False,
    trigger_downstream: bool = False,
) -> ChangeRequestRead:
    from service.change_requests import ChangeControl, activate_pipeline

    return await activate_pipeline(
        engine,
        version,
        principal=_actor(),
        reason=reason,
        control=ChangeControl.from_settings(Settings()),
        now=_now(),
        apply_at=apply_at,
        reevaluate=reevaluate,
        trigger_downstream=trigger_downstream,
    )


@main.group()
def thresholds() -> None:
    """Threshold policies: propose one from a file, list the applied versions."""


@thresholds.command("propose")
@click.argument("policy_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--reason", required=True, help="Why (the change request's reason).")
@click.option("--apply-at", type=click.DateTime(), default=None, help="Apply at this UTC time once approved.")
@click.option("--reevaluate", is_flag=True, help="On apply, re-qualify the leads scored in the window.")
@click.option("--trigger-downstream", is_flag=True, help="With --reevaluate: route leads that newly qualify.")
@click.option("--window-days", type=int, default=None, help="Default: LEADSCORE_CHANGE_WINDOW_DAYS.")
def thresholds_propose(
    policy_path: Path,
    reason: str,
    apply_at: dt.datetime | None,
    reevaluate: bool,
    trigger_downstream: bool,
    window_days: int | None,
) -> None:
    """Propose a threshold policy (YAML or JSON) as a change request; prints it with its impact."""
    import yaml
    from pydantic import ValidationError

    from service.change_requests import ChangeControl, propose
    from service.change_schemas import ChangeRequestCreate

    try:
        body = ChangeRequestCreate.model_validate(
            {
                "change": {"kind": "threshold_policy", "policy": yaml.safe_load(policy_path.read_text())},
                "reason": reason,
                "apply_at": _utc(apply_at),
                "reevaluate": reevaluate,
                "trigger_downstream": trigger_downstream,
                "window_days": window_days,
            }
        )
    except (yaml.YAMLError, ValidationError) as exc:
        raise click.ClickException(f"invalid policy {policy_path}: {exc}") from None
    control = ChangeControl.from_settings(Settings())
    _print_json(_summary(_with_engine(lambda e: propose(e, body, principal=_actor(), control=control, now=_now()))))


@thresholds.command("list")
def thresholds_list() -> None:
    """Every applied threshold policy version and which one is active."""
    from service.qualification import list_policies

    _print_json([p.model_dump(mode="json") for p in _with_engine(list_policies)])


@main.group("change-requests")
def change_requests() -> None:
    """Change requests: list, show, approve, apply, reject, withdraw (as the operating-system user)."""


@change_requests.command("list")
@click.option("--status", "statuses", multiple=True, help="Only these statuses (repeatable).")
@click.option("--limit", type=int, default=50, show_default=True)
def change_requests_list(statuses: tuple[str, ...], limit: int) -> None:
    """Change requests, newest first."""
    from service.change_requests import list_requests

    found = _with_engine(lambda e: list_requests(e, statuses=list(statuses) or None, limit=limit, before_id=None))
    _print_json([_summary(r) | {"reason": r.reason} for r in found])


@change_requests.command("show")
@click.argument("request_id", type=int)
def change_requests_show(request_id: int) -> None:
    """One change request with its impact preview and result."""
    from service.change_requests import get_request

    _print_json(_with_engine(lambda e: get_request(e, request_id)).model_dump(mode="json"))


@change_requests.command("approve")
@click.argument("request_id", type=int)
def change_requests_approve(request_id: int) -> None:
    """Approve (never your own); applies at once unless scheduled later."""
    from service.change_requests import ChangeControl, approve

    control = ChangeControl.from_settings(Settings())
    _print_json(
        _summary(_with_engine(lambda e: approve(e, request_id, principal=_actor(), control=control, now=_now())))
    )


@change_requests.command("apply")
@click.argument("request_id", type=int)
def change_requests_apply(request_id: int) -> None:
    """Apply an approved change now, even if scheduled later."""
    from service.change_requests import ChangeControl, apply_request

    control = ChangeControl.from_settings(Settings())
    principal = _actor()
    _print_json(
        _summary(
            _with_engine(
                lambda e: apply_request(
                    e, request_id, actor=principal.subject, role=principal.role, control=control, now=_now()
                )
            )
        )
    )


@change_requests.command("reject")
@click.argument("request_id", type=int)
@click.option("--reason", required=True)
def change_requests_reject(request_id: int, reason: str) -> None:
    """Reject a change not yet applied."""
    from service.change_requests import close
    from service.change_schemas import Decision

    decision = Decision(reason=reason)
    _print_json(
        _summary(_with_engine(lambda e: close(e, request_id, decision, withdraw=False, principal=_actor(), now=_now())))
    )


@change_requests.command("withdraw")
@click.argument("request_id", type=int)
@click.option("--reason", required=True)
def change_requests_withdraw(request_id: int, reason: str) -> None:
    """Withdraw your own change not yet applied."""
    from service.change_requests import close
    from service.change_schemas import Decision

    decision = Decision(reason=reason)
    _print_json(
        _summary(_with_engine(lambda e: close(e, request_id, decision, withdraw=True, principal=_actor(), now=_now())))
    )


@main.command()
@click.option("--concurrency", type=click.IntRange(min=1), default=None, help="Default: LEADSCORE_DELIVERY_CONCURRENCY")
@click.option("--metrics-port", type=int, default=None, help="Serve this process's Prometheus metrics on this port.")
def worker(concurrency: int | None, metrics_port: int | None) -> None:
    """Deliver the outbox to the CRM destinations and fetch HubSpot contacts for enrichment, until
    SIGTERM or SIGINT (then finish what is in flight)."""
    import signal

    from service.crm import InvalidDestinations
    from service.delivery import build_worker, refresh_outbox_gauges
    from service.enrichment import http_client as enrichment_http_client
    from service.enrichment import standalone_worker

    settings = Settings()

    async def run() -> None:
        # The loop's handlers first (they replace service.console's): from here a stop ends the
        # worker through `run_until`, which finishes what is in flight.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if console.stop_requested():
            return  # stopped while starting: nothing was claimed, so nothing to finish
        engine = create_engine(settings.database_url, pool_size=2)
        try:
            delivery, client = build_worker(engine, settings, concurrency=concurrency)
        except InvalidDestinations as exc:
            await engine.dispose()
            raise click.ClickException(str(exc)) from None

        async def gauges() -> None:
            while True:
                try:
                    await refresh_outbox_gauges(engine, delivery.breakers, now=_now())
                except Exception as exc:
                    click.echo(f"could not read outbox gauges: {exc}", err=True)
                await asyncio.sleep(5)

        reporter = asyncio.create_task(gauges()) if metrics_port else None
        try:
            # HubSpot enrichment shares the process (both drain a durable queue), on an HTTP client of
            # its own: its pool is sized for its fetches, the delivery one for deliveries.
            async with (
                enrichment_http_client(settings) as fetcher,
                standalone_worker(engine, settings, fetcher) as enrichment,
            ):
                enrichment.start()
                await delivery.run_until(stop)
        finally:
            if reporter is not None:
                reporter.cancel()
            await client.aclose()
            await engine.dispose()

    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=settings.host)
    asyncio.run(run())


@main.group()
def deliveries() -> None:
    """The CRM outbox: list deliveries, replay dead letters."""


@deliveries.command("list")
@click.option("--status", type=click.Choice(["pending", "in_flight", "delivered", "dead"]), default=None)
@click.option("--destination", default=None)
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
def deliveries_list(status: Any, destination: str | None, limit: int) -> None:
    """Deliveries, newest first."""
    from service.delivery.admin import list_deliveries

    page = _with_engine(
        lambda e: list_deliveries(e, status=status, destination=destination, lead_id=None, cursor=None, limit=limit)
    )
    _print_json([item.model_dump(mode="json") for item in page.items])


@deliveries.command("replay")
@click.argument("delivery_id", required=False)
@click.option("--dead", is_flag=True, help="Replay dead letters (with the filters below) instead of one id.")
@click.option("--destination", default=None)
@click.option("--status-code", type=int, default=None, help="Only dead letters whose last answer had this status.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=1000, show_default=True)
def deliveries_replay(
    delivery_id: str | None, dead: bool, destination: str | None, status_code: int | None, limit: int
) -> None:
    """Send one delivery again (dead or delivered), or every matching dead letter with --dead."""
    import uuid

    from service.delivery.admin import replay_dead_letters, replay_delivery
    from service.delivery.schemas import BulkReplayRequest

    if (delivery_id is None) == (not dead):
        raise click.UsageError("give a DELIVERY_ID or --dead")
    if delivery_id is not None:
        try:
            id_ = uuid.UUID(delivery_id)
        except ValueError:
            raise click.BadParameter("not a delivery id", param_hint="DELIVERY_ID") from None
        one = _with_engine(lambda e: replay_delivery(e, id_, now=_now()))
        _print_json(one.model_dump(mode="json"))
        return
    request = BulkReplayRequest(destination=destination, status_code=status_code, limit=limit)
    bulk = _with_engine(lambda e: replay_dead_letters(e, request, now=_now()))
    _print_json(bulk.model_dump(mode="json"))


@main.group()
def routing() -> None:
    """Routing rules versions, pool counters and account owners."""


def _routing_spec(spec_path: Path) -> Any:
    from service.routing import InvalidRoutingSpec, parse_routing_spec

    try:
        return parse_routing_spec(spec_path.read_text())
    except InvalidRoutingSpec as exc:
        raise click.ClickException(f"invalid routing spec {spec_path}: {json.dumps(exc.detail)}") from None


_SPEC_FILE = click.argument("spec_path", metavar="FILE", type=click.Path(exists=True, dir_okay=False, path_type=Path))


@routing.command("load")
@_SPEC_FILE
def routing_load(spec_path: Path) -> None:
    """Validate a routing spec (YAML) and store it as a new immutable version; activating it is a
    change request (`routing activate VERSION`)."""
    from service.routing import create_version

    spec = _routing_spec(spec_path)
    version = _with_engine(lambda e: create_version(e, spec, actor=_actor().subject, now=_now()))
    _print_json({"version": version, "name": spec.name})


def _propose_routing(change: Any, reason: str | None, apply_at: dt.datetime | None) -> None:
    from service.change_requests import ChangeControl, activate_routing

    control = ChangeControl.from_settings(Settings())
    request = _with_engine(
        lambda e: activate_routing(
            e, change, principal=_actor(), reason=reason, control=control, now=_now(), apply_at=_utc(apply_at)
        )
    )
    summary = _summary(request)
    if request.impact is not None and request.impact.routing is not None:
        summary["impact"] = request.impact.routing.model_dump(mode="json", exclude={"sample"})
    _print_json(summary)


_ROUTING_REASON = click.option("--reason", default=None, help="Why (needed once routing rules have been active).")
_APPLY_AT = click.option(
    "--apply-at", type=click.DateTime(), default=None, help="Apply at this UTC time once approved."
)


@routing.command("propose")
@_SPEC_FILE
@_ROUTING_REASON
@_APPLY_AT
def routing_propose(spec_path: Path, reason: str | None, apply_at: dt.datetime | None) -> None:
    """Propose a routing spec (YAML) as a change request, with its impact; stored as a new version
    when applied. The very first routing rules (none ever active) apply at once (a bootstrap)."""
    from service.change_schemas import RoutingRulesChange

    spec = _routing_spec(spec_path)
    _propose_routing(RoutingRulesChange(kind="routing_rules", spec=spec.model_dump(mode="json")), reason, apply_at)


@routing.command("list")
def routing_list() -> None:
    """Every routing rules version (without specs), which is active, and the activations."""
    from service.routing import list_versions

    listed = _with_engine(list_versions).model_dump(mode="json", exclude={"versions": {"__all__": {"spec"}}})
    _print_json(listed)


@routing.command("activate")
@click.argument("version", type=int)
@_ROUTING_REASON
@_APPLY_AT
def routing_activate(version: int, reason: str | None, apply_at: dt.datetime | None) -> None:
    """Propose making a stored version the active one (a change request that another ops identity
    approves); at once when no routing rules were ever active (a bootstrap)."""
    from service.change_schemas import RoutingRulesChange

    _propose_routing(RoutingRulesChange(kind="routing_rules", version=version), reason, apply_at)


@routing.command("rollback")
@click.argument("version", type=int)
@click.option("--reason", required=True, help="Why (the change request's reason).")
@_APPLY_AT
def routing_rollback(version: int, reason: str, apply_at: dt.datetime | None) -> None:
    """Propose restoring a routing rules version that was active before."""
    from service.change_requests import ChangeControl, propose
    from service.change_schemas import ChangeRequestCreate, RollbackChange

    body = ChangeRequestCreate(
        change=RollbackChange(kind="rollback", target="routing_rules", version=version),
        reason=reason,
        apply_at=_utc(apply_at),
    )
    control = ChangeControl.from_settings(Settings())
    _print_json(_summary(_with_engine(lambda e: propose(e, body, principal=_actor(), control=control, now=_now()))))


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


# --- reports ---------------------------------------------------------------------------------------


def _report_time(_ctx: click.Context, _param: click.Parameter, value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        return _utc(dt.datetime.fromisoformat(value))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 time") from None


_since = click.option(
    "--since", callback=_report_time, help="Start, inclusive (ISO 8601; UTC without an offset; default 30 days ago)."
)
_until = click.option("--until", callback=_report_time, help="End, exclusive (ISO 8601; default now).")
_format = click.option("--format", "fmt", type=click.Choice(["json", "csv"]), default="json", show_default=True)


@main.group()
def reports() -> None:
    """Reports, as the HTTP API's `/v1/reports/...`: JSON, or the rows as CSV (`--format csv`)."""


@reports.command("funnel")
@_since
@_until
@click.option(
    "--by", type=click.Choice(["source", "policy"]), default=None, help="Break down by first source or policy."
)
@click.option("--source", default=None, help="Only leads whose first event came from this source.")
@_format
def reports_funnel(since: dt.datetime | None, until: dt.datetime | None, by: Any, source: str | None, fmt: str) -> None:
    """Leads per lifecycle stage: the period's new leads, how far they got, and stage entries."""
    from service.reports.common import csv_text, resolve_period
    from service.reports.funnel import FunnelRow, funnel_report

    now = _now()
    report = _with_engine(
        lambda e: funnel_report(e, period=resolve_period(since, until, now=now), by=by, source=source, now=now)
    )
    if fmt == "csv":
        click.echo(csv_text(report.rows, list(FunnelRow.model_fields)), nl=False)
    else:
        _print_json(report.model_dump(mode="json"))


@reports.command("routing")
@_since
@_until
@click.option("--pool", default=None, help="Only this pool's assignments and its leads' handoffs.")
@click.option(
    "--table",
    type=click.Choice(["assignments", "pools", "owners", "deliveries"]),
    default="assignments",
    show_default=True,
    help="The table a CSV export carries.",
)
@_format
def reports_routing(
    since: dt.datetime | None, until: dt.datetime | None, pool: str | None, table: Any, fmt: str
) -> None:
    """Assignments per owner, pool and queue against the pools' shares, and time to CRM delivery."""
    from service.reports.common import csv_text, resolve_period
    from service.reports.routing import routing_report

    now = _now()
    report = _with_engine(lambda e: routing_report(e, period=resolve_period(since, until, now=now), pool=pool, now=now))
    if fmt == "csv":
        rows, model = report.table(table)
        click.echo(csv_text(rows, list(model.model_fields)), nl=False)
    else:
        _print_json(report.model_dump(mode="json"))


@reports.command("score-bands")
@_since
@_until
@click.option("--pipeline", type=int, default=None, help="A pipeline version (default: the active one).")
@click.option("--bands", default=None, help="Band edges from 0 to 100, comma-separated (default 0,20,40,60,80,100).")
@click.option("--band-width", type=float, default=None, help="Bands of this many points instead of --bands.")
@_format
def reports_score_bands(
    since: dt.datetime | None,
    until: dt.datetime | None,
    pipeline: int | None,
    bands: str | None,
    band_width: float | None,
    fmt: str,
) -> None:
    """Conversion rate per score band and per grade, with a monotonicity check."""
    from service.reports.common import csv_text, resolve_period
    from service.reports.scores import ScoreBandRow, score_bands_report

    now = _now()
    report = _with_engine(
        lambda e: score_bands_report(
            e, period=resolve_period(since, until, now=now), pipeline=pipeline, bands=bands, band_width=band_width
        )
    )
    if fmt == "csv":
        click.echo(csv_text(report.rows, list(ScoreBandRow.model_fields)), nl=False)
    else:
        _print_json(report.model_dump(mode="json"))


@reports.command("model")
@_since
@_until
@click.option("--pipeline", type=int, default=None, help="A pipeline version (default: the active one).")
@_format
def reports_model(since: dt.datetime | None, until: dt.datetime | None, pipeline: int | None, fmt: str) -> None:
    """ROC-AUC, Brier, log loss and calibration on outcomes since activation (or in the period), with drift warnings."""
    from service.reports.common import csv_text, resolve_period
    from service.reports.scores import CalibrationRow, model_report

    now = _now()
    settings = Settings()
    report = _with_engine(
        lambda e: model_report(
            e,
            # Without a period: the outcomes since the version was last made active.
            period=resolve_period(since, until, now=now) if since or until else None,
            pipeline=pipeline,
            min_outcomes=settings.report_model_min_outcomes,
            roc_auc_tolerance=settings.report_drift_roc_auc_tolerance,
            brier_tolerance=settings.report_drift_brier_tolerance,
            now=now,
        )
    )
    if fmt == "csv":
        click.echo(csv_text(report.rows, list(CalibrationRow.model_fields)), nl=False)
    else:
        _print_json(report.model_dump(mode="json"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
