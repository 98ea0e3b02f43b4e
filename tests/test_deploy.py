"""The deployment files in deploy/ agree with the code they deploy.

Nothing here starts Docker or Kubernetes: the files are parsed and checked against the service
itself. Commands against the click group of `leadscore`, `LEADSCORE_*` variables against
`Settings`, metric and label names in PromQL against the Prometheus registry, probe paths against
the app's routes, Kubernetes objects against the API schemas (kubernetes-validate, strict, so a
misspelt field fails), and the cross-references between files (ports, names, selectors, mounts).
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml
from fastapi import FastAPI
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase
from sqlalchemy.engine import make_url
from starlette.routing import Match

import service.metrics  # noqa: F401  (registers the service's metrics)
from service import cli
from service.app import create_app
from service.settings import Settings
from tests.conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
PROMETHEUS_FILE = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_FILE = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD_FILE = DEPLOY / "grafana" / "leadscore.json"
GRAFANA_DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARDS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "leadscore.yml"
SECRET_TEMPLATE = K8S / "secret.example.yaml"

# Commands the deploy files already run that a branch being built in parallel adds to the CLI.
# Tolerated ONLY while absent: once one lands, `test_pending_commands_have_not_landed` fails until
# it is removed from here (and from then on it is checked like every other command).
PENDING_COMMANDS: set[str] = set()

# The Kubernetes version whose API schemas the manifests are validated against.
KUBERNETES_VERSION = "1.30.0"
API_DEPLOYMENT = "leadscore-api"
WORKER_DEPLOYMENT = "leadscore-worker"
SCRAPE_JOBS = {"leadscore-api", "leadscore-worker"}

DEPLOY_FILES = sorted(p for p in DEPLOY.rglob("*") if p.is_file())
YAML_FILES = [p for p in DEPLOY_FILES if p.suffix in (".yml", ".yaml")]
JSON_FILES = [p for p in DEPLOY_FILES if p.suffix == ".json"]


def _id(path: Path) -> str:
    return str(path.relative_to(DEPLOY))


# --- loading: YAML and JSON that refuse duplicate keys (a silently overwritten key is a typo) ----


class _StrictLoader(yaml.SafeLoader):
    pass


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor` merges; its keys may be overridden on purpose
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml(path: Path) -> list[Any]:
    return list(yaml.load_all(path.read_text(), Loader=_StrictLoader))  # noqa: S506 (a SafeLoader)


def load_one(path: Path) -> dict[str, Any]:
    (document,) = load_yaml(path)
    assert isinstance(document, dict), path
    return document


def _no_duplicate_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    duplicates = {k for k in keys if keys.count(k) > 1}
    assert not duplicates, f"duplicate keys {duplicates}"
    return dict(pairs)


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(), object_pairs_hook=_no_duplicate_pairs)


def k8s_objects() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml" for doc in load_yaml(path)]


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def only_container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def project_version() -> str:
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert isinstance(version, str)
    return version


# --- what the code defines ----------------------------------------------------------------------


def check_cli_command(argv: list[str]) -> None:
    """Fail unless `argv` is a `leadscore` command with options it accepts (without running it)."""
    assert argv[0] == "leadscore", argv
    command: click.Command = cli.main
    words = argv[1:]
    path = ["leadscore"]
    while isinstance(command, click.Group):
        assert words, f"{' '.join(argv)} names a group, not a command"
        word, words = words[0], words[1:]
        sub = command.commands.get(word)
        if sub is None and command is cli.main and word in PENDING_COMMANDS:
            return  # not on this branch yet: see PENDING_COMMANDS
        assert sub is not None, f"`{' '.join([*path, word])}` is not a command of {sorted(command.commands)}"
        command, path = sub, [*path, word]
    # Parse the remaining options and arguments as click would, without invoking the command.
    command.make_context(" ".join(path), list(words))


def settings_variables() -> set[str]:
    return {f"LEADSCORE_{name.upper()}" for name in Settings.model_fields}


def check_env_names(names: Any, where: str) -> None:
    unknown = {n for n in names if n.startswith("LEADSCORE_")} - settings_variables()
    assert not unknown, f"{where}: {sorted(unknown)} are not fields of service.settings.Settings"


@dataclass(frozen=True)
class Metric:
    kind: str
    labels: frozenset[str]


def service_metrics() -> dict[str, Metric]:
    """Every series name the service exposes (`_total`, `_bucket`, `_sum`, `_count` included), from
    the Prometheus registry, with its label names (which only the metric objects know)."""
    labels: dict[str, tuple[str, ...]] = {}
    for module_name, module in list(sys.modules.items()):
        if module_name == "service" or module_name.startswith("service."):
            for value in vars(module).values():
                if isinstance(value, MetricWrapperBase):
                    labels[value._name] = value._labelnames  # no public accessor for either
    series: dict[str, Metric] = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("leadscore_"):
            continue
        names = {
            "counter": [f"{family.name}_total"],
            "histogram": [f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"],
            "gauge": [family.name],
        }[family.type]
        for name in names:
            extra = {"le"} if name.endswith("_bucket") else set()
            series[name] = Metric(family.type, frozenset(labels[family.name]) | extra)
    return series


@cache
def _app() -> FastAPI:
    return create_app(Settings(_env_file=None))  # type: ignore[call-arg]


def app_serves(path: str) -> bool:
    """Whether the app routes `GET path` (as its router would match it; nothing is started)."""
    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": [], "query_string": b""}
    return any(route.matches(scope)[0] == Match.FULL for route in _app().router.routes)


def test_app_serves_knows_the_routes() -> None:
    assert app_serves("/healthz")
    assert app_serves("/v1/leads/some-id")
    assert not app_serves("/readyzz")


# --- a small PromQL reader: enough to name every metric, label, function and variable used -------

PROMQL_AGGREGATIONS = {"sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk", "quantile"}
PROMQL_FUNCTIONS = {
    *PROMQL_AGGREGATIONS,
    *("rate", "irate", "increase", "delta", "idelta", "deriv", "changes", "resets", "histogram_quantile"),
    *("absent", "absent_over_time", "avg_over_time", "max_over_time", "min_over_time", "sum_over_time"),
    *("clamp_min", "clamp_max", "abs", "ceil", "floor", "round", "scalar", "vector", "time", "timestamp"),
}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
PROMQL_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
PROMETHEUS_SERIES = {"up": Metric("gauge", frozenset({"job", "instance"}))}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}
_TOKEN = re.compile(
    r"""
      (?P<comment>\#[^\n]*)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<variable>\$\{\w+\}|\$\w+)
    | (?P<number>\d+(?:\.\d+)?(?:(?:ms|[smhdwy])\d*)*)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=(){}\[\],:])
    | (?P<space>\s+)
    """,
    re.VERBOSE,
)


@dataclass
class Query:
    metrics: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)
    variables: set[str] = field(default_factory=set)
    result_labels: set[str] = field(default_factory=set)


def read_promql(expr: str) -> Query:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        assert match, f"cannot read {expr[pos:]!r} in {expr!r}"
        kind = match.lastgroup
        assert kind is not None
        if kind not in ("comment", "space", "string"):
            tokens.append((kind, match.group()))
        pos = match.end()
    # Grafana expands variables inside label values too.
    query = Query(variables={m.group(1) for m in re.finditer(r"\$\{?(\w+)\}?", expr)})
    closing = {"(": ")", "{": "}", "[": "]"}
    stack: list[str] = []  # open brackets; "(label" marks a by (...) / on (...) list
    for i, (kind, text) in enumerate(tokens):
        after = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "op" and text in closing:
            grouping = text == "(" and i > 0 and tokens[i - 1][1] in PROMQL_GROUPING
            stack.append("(label" if grouping else text)
        elif kind == "op" and text in closing.values():
            assert stack, f"unbalanced {text!r} in {expr!r}"
            assert closing[stack.pop()[0]] == text, f"mismatched {text!r} in {expr!r}"
        elif kind == "ident":
            if stack and stack[-1] in ("{", "(label"):
                if stack[-1] == "{":
                    assert after in ("=", "!=", "=~", "!~"), f"{text!r} in {expr!r} is not a label matcher"
                query.labels.add(text)
            elif text in PROMQL_KEYWORDS or text == "offset":
                pass
            elif after == "(" or (text in PROMQL_FUNCTIONS and after in ("by", "without")):
                query.functions.add(text)
            else:
                query.metrics.add(text)
    assert not stack, f"unclosed {stack} in {expr!r}"
    return query


def check_promql(expr: str, *, series: dict[str, Metric], variables: AbstractSet[str] = frozenset()) -> Query:
    """Fail unless every metric, label, function and variable in `expr` exists."""
    query = read_promql(expr)
    known = {**series, **PROMETHEUS_SERIES}
    assert query.metrics, f"no metric in {expr!r}"
    unknown = query.metrics - set(known)
    assert not unknown, f"{sorted(unknown)} in {expr!r}: not metrics the service registers"
    functions = query.functions - PROMQL_FUNCTIONS
    assert not functions, f"{sorted(functions)} in {expr!r}: not PromQL functions"
    labels = set().union(*(known[m].labels for m in query.metrics))
    assert query.labels <= labels, f"labels {sorted(query.labels - labels)} in {expr!r}: the metrics have {labels}"
    undefined = query.variables - set(variables) - GRAFANA_BUILTINS
    assert not undefined, f"variables {sorted(undefined)} in {expr!r} are not defined"
    # Labels a legend or an annotation may show: the grouping labels once aggregated, else all.
    query.result_labels = set(query.labels) if query.functions & PROMQL_AGGREGATIONS else labels
    return query


PROMETHEUS_DURATION = re.compile(r"^(\d+(ms|[smhdwy]))+$")


# --- every file parses --------------------------------------------------------------------------


def test_the_deploy_tree_is_complete() -> None:
    expected = {
        COMPOSE_FILE,
        PROMETHEUS_FILE,
        ALERTS_FILE,
        DASHBOARD_FILE,
        GRAFANA_DATASOURCES,
        GRAFANA_DASHBOARDS,
        SECRET_TEMPLATE,
        K8S / "kustomization.yaml",
    }
    assert expected <= set(DEPLOY_FILES)
    assert set(DEPLOY_FILES) == set(YAML_FILES) | set(JSON_FILES), "only YAML and JSON in deploy/"


@pytest.mark.parametrize("path", YAML_FILES, ids=_id)
def test_yaml_parses(path: Path) -> None:
    documents = load_yaml(path)
    assert documents
    assert all(isinstance(d, dict) and d for d in documents), "every document is a non-empty mapping"


@pytest.mark.parametrize("path", JSON_FILES, ids=_id)
def test_json_parses(path: Path) -> None:
    assert isinstance(load_json(path), dict)


def test_the_yaml_loader_refuses_duplicate_keys(tmp_path: Path) -> None:
    path = tmp_path / "dup.yml"
    path.write_text("a: 1\nb: 2\na: 3\n")
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'a'"):
        load_yaml(path)


# --- the CLI ----------------------------------------------------------------------------------


def test_pending_commands_have_not_landed() -> None:
    landed = PENDING_COMMANDS & set(cli.main.commands)
    assert not landed, f"`leadscore {landed}` exists now: remove it from PENDING_COMMANDS"


def test_the_command_check_refuses_typos() -> None:
    check_cli_command(["leadscore", "serve", "--workers", "2"])
    check_cli_command(["leadscore", "sources", "rotate", "hubspot"])
    for argv in (["leadscore", "migrat"], ["leadscore", "serve", "--worker", "2"], ["leadscore", "sources"]):
        with pytest.raises((AssertionError, click.UsageError)):
            check_cli_command(argv)


def compose_services() -> dict[str, Any]:
    services = load_one(COMPOSE_FILE)["services"]
    assert isinstance(services, dict)
    return services


def leadscore_commands() -> Iterator[tuple[str, list[str]]]:
    for name, service_ in compose_services().items():
        if str(service_["image"]).startswith("leadscore:"):
            yield f"compose {name}", service_["command"]
    for obj in k8s_objects():
        if obj["kind"] in ("Deployment", "Job"):
            yield f"k8s {obj['metadata']['name']}", only_container(obj)["command"]
    cmd = re.search(r"^CMD (\[.*\])$", (REPO_ROOT / "Dockerfile").read_text(), flags=re.M)
    assert cmd
    yield "Dockerfile CMD", json.loads(cmd.group(1))


def test_every_container_command_is_a_leadscore_command() -> None:
    seen = {}
    for where, argv in leadscore_commands():
        assert isinstance(argv, list), f"{where}: exec form (a list), so signals reach the process"
        check_cli_command(argv)
        seen[where] = argv
    assert seen["compose migrate"] == seen["k8s leadscore-migrate"] == ["leadscore", "migrate"]
    assert seen["compose api"] == seen["k8s leadscore-api"] == seen["Dockerfile CMD"] == ["leadscore", "serve"]
    # The worker serves its delivery metrics on the port Prometheus scrapes (see the ports checks).
    worker = ["leadscore", "worker", "--metrics-port", "8001"]
    assert seen["compose worker"] == seen["k8s leadscore-worker"] == worker


# --- images -----------------------------------------------------------------------------------


def all_images() -> Iterator[tuple[str, str]]:
    for name, service_ in compose_services().items():
        yield f"compose {name}", service_["image"]
    for obj in k8s_objects():
        if obj["kind"] in ("Deployment", "Job"):
            for container in obj["spec"]["template"]["spec"]["containers"]:
                yield f"k8s {obj['metadata']['name']}", container["image"]
    for line in (REPO_ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM "):
            yield "Dockerfile", line.split()[1]


def test_every_image_tag_is_pinned() -> None:
    images = dict(all_images())
    assert len(images) >= 10
    for where, image in images.items():
        name, _, tag = image.rpartition(":")
        assert name, f"{where}: {image} has no tag"
        assert "/" not in tag, f"{where}: {image} has no tag"
        assert tag != "latest", f"{where}: {image}"
        # A version, not a moving major alone (`postgres:15`), except Python's minor series.
        assert re.fullmatch(r"v?\d+\.\d+(\.\d+)?(-[a-z0-9.-]+)?", tag), f"{where}: {image} is not a pinned version"
    ours = {where: image for where, image in images.items() if image.startswith("leadscore:")}
    assert set(ours.values()) == {f"leadscore:{project_version()}"}, ours
    assert images["compose postgres"].startswith("postgres:15."), "production runs PostgreSQL 15"
    kustomize = load_one(K8S / "kustomization.yaml")["images"]
    assert kustomize == [{"name": "leadscore", "newName": "leadscore", "newTag": project_version()}]


# --- docker compose ---------------------------------------------------------------------------


def _interpolated(value: str) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR:?message}` with a stand-in value."""
    return re.sub(r"\$\{([A-Z_]+)(?::?[-?][^}]*)?\}", "stand-in", value)


def test_compose_runs_the_stack_in_order() -> None:
    services = compose_services()
    assert set(services) == {"postgres", "migrate", "api", "worker", "prometheus", "grafana"}
    postgres = services["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert "pgdata:/var/lib/postgresql/data" in postgres["volumes"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert services[name]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    # The image's HEALTHCHECK probes the HTTP port: only `serve` opens it.
    assert services["migrate"]["healthcheck"] == services["worker"]["healthcheck"] == {"disable": True}
    builds = [name for name, s in services.items() if "build" in s]
    assert builds == ["migrate"], "the image is built once, by the service that runs first"
    assert (COMPOSE_FILE.parent / services["migrate"]["build"]["context"] / "Dockerfile").is_file()


def test_compose_settings_and_database_url() -> None:
    services = compose_services()
    for name in ("migrate", "api", "worker"):
        env = services[name]["environment"]
        assert isinstance(env, dict), name
        check_env_names(env, f"compose {name}")
        url = make_url(_interpolated(env["LEADSCORE_DATABASE_URL"]))
        postgres_env = services["postgres"]["environment"]
        assert url.drivername == "postgresql+asyncpg"
        assert (url.host, url.port) == ("postgres", 5432)
        assert url.username == postgres_env["POSTGRES_USER"]
        assert url.database == postgres_env["POSTGRES_DB"]


def test_compose_variables_are_documented() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    variables = set(re.findall(r"\$\{([A-Z_]+)", COMPOSE_FILE.read_text()))
    assert variables == {"POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"}
    for variable in variables:
        assert variable in readme


def test_compose_api_readiness_and_ports() -> None:
    api = compose_services()["api"]
    port = int(api["environment"].get("LEADSCORE_PORT", 8000))
    assert f"http://127.0.0.1:{port}/readyz" in " ".join(api["healthcheck"]["test"])
    assert api["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert app_serves("/readyz")


def test_compose_mounts_exist_and_volumes_are_declared() -> None:
    compose = load_one(COMPOSE_FILE)
    for name, service_ in compose["services"].items():
        for mount in service_.get("volumes", []):
            source, target = mount.split(":")[:2]
            if source.startswith("."):
                assert (COMPOSE_FILE.parent / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"
            assert target.startswith("/"), f"{name}: {mount}"


# --- Prometheus ---------------------------------------------------------------------------------


def compose_mount_target(service_name: str, source: Path) -> str:
    for mount in compose_services()[service_name]["volumes"]:
        host, target = mount.split(":")[:2]
        if (COMPOSE_FILE.parent / host).resolve() == source.resolve():
            return str(target)
    raise AssertionError(f"{source} is not mounted into {service_name}")


def test_prometheus_loads_the_rules_and_scrapes_api_and_worker() -> None:
    config = load_one(PROMETHEUS_FILE)
    assert config["rule_files"] == [compose_mount_target("prometheus", ALERTS_FILE)]
    assert compose_mount_target("prometheus", PROMETHEUS_FILE) in compose_services()["prometheus"]["command"][0]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == SCRAPE_JOBS
    assert jobs["leadscore-api"]["metrics_path"] == "/metrics"
    assert app_serves("/metrics")
    (api_sd,) = jobs["leadscore-api"]["dns_sd_configs"]
    assert api_sd["names"] == ["api"]
    assert api_sd["port"] == int(compose_services()["api"]["environment"].get("LEADSCORE_PORT", 8000))
    (worker_sd,) = jobs["leadscore-worker"]["dns_sd_configs"]
    assert worker_sd["names"] == ["worker"]
    assert [str(worker_sd["port"])] == compose_services()["worker"]["expose"]
    worker = k8s_object("Deployment", WORKER_DEPLOYMENT)
    assert worker["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(worker_sd["port"])
    assert [p["containerPort"] for p in only_container(worker)["ports"]] == [worker_sd["port"]]
    # ...and the worker serves its metrics on that port.
    for argv in (compose_services()["worker"]["command"], only_container(worker)["command"]):
        assert argv[argv.index("--metrics-port") + 1] == str(worker_sd["port"])


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_one(ALERTS_FILE)["groups"] for rule in group["rules"]]


def test_the_promql_reader_catches_typos() -> None:
    series = service_metrics()
    check_promql('sum by (source) (rate(leadscore_webhook_events_total{outcome="accepted"}[5m]))', series=series)
    bad = [
        "rate(leadscore_webhook_event_total[5m])",  # metric
        'sum by (sorce) (rate(leadscore_webhook_events_total{outcome="x"}[5m]))',  # grouping label
        'rate(leadscore_deliveries_total{destinaton="crm"}[5m])',  # matcher label
        "histogram_quantle(0.99, rate(leadscore_score_duration_seconds_bucket[5m]))",  # function
        "sum by (le) (rate(leadscore_score_duration_seconds_bucket[$__rate_intervl]))",  # variable
        "leadscore_score_duration_seconds",  # a histogram has no bare series
        "sum(rate(leadscore_db_errors_total[5m])",  # unbalanced
    ]
    for expr in bad:
        with pytest.raises(AssertionError):
            check_promql(expr, series=series)


def test_alert_rules_are_well_formed_and_use_only_service_metrics() -> None:
    series = service_metrics()
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    used: set[str] = set()
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert PROMETHEUS_DURATION.match(rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
        query = check_promql(rule["expr"], series=series)
        used |= query.metrics
        templated = set(re.findall(r"\$labels\.(\w+)", " ".join(rule["annotations"].values())))
        missing = templated - query.result_labels
        assert not missing, f"{rule['alert']}: {missing} not in its result"
    for name in ("leadscore_webhook_events_total", "leadscore_http_request_duration_seconds_count"):
        assert name in used
    for name in ("leadscore_http_request_duration_seconds_bucket", "leadscore_outbox_oldest_pending_age_seconds"):
        assert name in used
    for name in ("leadscore_dead_letters", "leadscore_circuit_state", "leadscore_db_errors_total", "up"):
        assert name in used
    assert any(
        re.search(r'job=~?"[^"]*leadscore-api', r["expr"]) for r in rules if "up" in read_promql(r["expr"]).metrics
    )


def test_every_alert_is_explained_in_the_readme() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Deploy and scale", 1)[1].split("\n## ", 1)[0]
    for rule in alert_rules():
        assert f"`{rule['alert']}`" in section, f"README: what to do when {rule['alert']} fires"


# --- Grafana ------------------------------------------------------------------------------------


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in load_json(DASHBOARD_FILE)["panels"] if p["type"] != "row"]


def test_grafana_is_provisioned_with_the_dashboard_and_its_datasource() -> None:
    (datasource,) = load_one(GRAFANA_DATASOURCES)["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in compose_services()
    (provider,) = load_one(GRAFANA_DASHBOARDS)["providers"]
    mounted = compose_mount_target("grafana", DASHBOARD_FILE)
    assert str(Path(mounted).parent) == provider["options"]["path"]
    for source in (GRAFANA_DATASOURCES.parent, GRAFANA_DASHBOARDS.parent):
        assert compose_mount_target("grafana", source).startswith("/etc/grafana/provisioning/")
    dashboard = load_json(DASHBOARD_FILE)
    refs = [p["datasource"] for p in dashboard_panels()]
    refs += [t["datasource"] for p in dashboard_panels() for t in p["targets"]]
    refs += [v["datasource"] for v in dashboard["templating"]["list"]]
    assert all(ref == {"type": "prometheus", "uid": datasource["uid"]} for ref in refs)


def test_dashboard_queries_use_only_service_metrics_and_cover_all_of_them() -> None:
    series = service_metrics()
    dashboard = load_json(DASHBOARD_FILE)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for variable in dashboard["templating"]["list"]:
        match = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]["query"])
        assert match, variable["name"]
        assert match.group(2) in series[match.group(1)].labels
    used: set[str] = set()
    for panel in dashboard_panels():
        assert panel["title"], panel["id"]
        assert panel["description"], panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            query = check_promql(target["expr"], series=series, variables=variables)
            used |= query.metrics
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert legend <= query.result_labels, (
                f"{panel['title']}: legend {legend - query.result_labels} not in the result"
            )
    every_metric = {m for m in series if not m.endswith(("_sum", "_count"))}
    missing = {m for m in every_metric if m not in used and m.removesuffix("_bucket") + "_count" not in used}
    assert not missing, f"no panel shows {sorted(missing)}"


def test_dashboard_layout() -> None:
    dashboard = load_json(DASHBOARD_FILE)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"]
    assert dashboard["schemaVersion"] >= 36
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        own = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not own & cells, f"{panel['title']} overlaps another panel"
        cells |= own


# --- Kubernetes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("obj", k8s_objects(), ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_k8s_objects_match_the_api_schema(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_schema_check_catches_misspelt_fields() -> None:
    deployment = k8s_object("Deployment", API_DEPLOYMENT)
    container = only_container(deployment)
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    kustomization = load_one(K8S / "kustomization.yaml")
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", SECRET_TEMPLATE.name}
    assert sorted(kustomization["resources"]) == sorted(manifests)
    (namespace,) = [o for o in k8s_objects() if o["kind"] == "Namespace"]
    assert kustomization["namespace"] == namespace["metadata"]["name"]
    assert load_one(SECRET_TEMPLATE)["metadata"]["namespace"] == namespace["metadata"]["name"]


def test_k8s_settings_come_from_the_configmap_and_the_secret() -> None:
    config = k8s_object("ConfigMap", "leadscore-config")
    secret = load_one(SECRET_TEMPLATE)
    check_env_names(config["data"], "ConfigMap")
    check_env_names(secret["stringData"], "Secret template")
    assert all(k.startswith("LEADSCORE_") for k in [*config["data"], *secret["stringData"]])
    assert "LEADSCORE_DATABASE_URL" not in config["data"], "the database URL holds a password: Secret only"
    assert set(secret["stringData"]) == {"LEADSCORE_DATABASE_URL"}
    assert make_url(secret["stringData"]["LEADSCORE_DATABASE_URL"]).drivername == "postgresql+asyncpg"
    for obj in k8s_objects():
        if obj["kind"] in ("Deployment", "Job"):
            container = only_container(obj)
            check_env_names([e["name"] for e in container.get("env", [])], obj["metadata"]["name"])
            refs = [next(iter(ref.items())) for ref in container["envFrom"]]
            assert refs == [
                ("configMapRef", {"name": config["metadata"]["name"]}),
                ("secretRef", {"name": secret["metadata"]["name"]}),
            ], obj["metadata"]["name"]


def test_api_probes_ports_and_service_agree_with_the_app() -> None:
    api = k8s_object("Deployment", API_DEPLOYMENT)
    container = only_container(api)
    port = int(k8s_object("ConfigMap", "leadscore-config")["data"]["LEADSCORE_PORT"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": port}
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert app_serves(probe["path"])
        assert ports[probe["port"]] == port
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert app_serves("/metrics")
    assert annotations["prometheus.io/port"] == str(port)
    pod_labels = api["spec"]["template"]["metadata"]["labels"]
    assert api["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service_ = k8s_object("Service", API_DEPLOYMENT)
    assert service_["spec"]["selector"].items() <= pod_labels.items()
    worker_labels = k8s_object("Deployment", WORKER_DEPLOYMENT)["spec"]["template"]["metadata"]["labels"]
    assert not service_["spec"]["selector"].items() <= worker_labels.items(), "the Service must not pick workers"
    (service_port,) = service_["spec"]["ports"]
    assert service_port["targetPort"] in ports


def test_hpa_and_pdb_target_the_api() -> None:
    api = k8s_object("Deployment", API_DEPLOYMENT)
    hpa = k8s_object("HorizontalPodAutoscaler", API_DEPLOYMENT)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": api["apiVersion"],
        "kind": "Deployment",
        "name": API_DEPLOYMENT,
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource"
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in only_container(api)["resources"]["requests"], "CPU utilisation is relative to the request"
    assert hpa["spec"]["minReplicas"] <= api["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    pdb = k8s_object("PodDisruptionBudget", API_DEPLOYMENT)
    pod_labels = api["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a drain must be able to evict one"


def test_connection_budget_fits_postgresql_defaults() -> None:
    # Each process may hold 2 x LEADSCORE_DB_POOL_SIZE connections (pool + overflow, service.db).
    config = k8s_object("ConfigMap", "leadscore-config")["data"]
    hpa = k8s_object("HorizontalPodAutoscaler", API_DEPLOYMENT)
    api = hpa["spec"]["maxReplicas"] * int(config["LEADSCORE_WORKERS"]) * 2 * int(config["LEADSCORE_DB_POOL_SIZE"])
    worker = k8s_object("Deployment", WORKER_DEPLOYMENT)
    worker_env = {e["name"]: e["value"] for e in only_container(worker)["env"]}
    workers = worker["spec"]["replicas"] * 2 * int(worker_env["LEADSCORE_DB_POOL_SIZE"])
    assert api + workers <= 100 - 3, "PostgreSQL's default max_connections less its superuser reserve"


def test_every_pod_runs_as_the_image_user_without_privileges() -> None:
    uid = re.search(r"useradd .*--uid (\d+) leadscore", (REPO_ROOT / "Dockerfile").read_text())
    assert uid
    for obj in k8s_objects():
        if obj["kind"] not in ("Deployment", "Job"):
            continue
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == int(uid.group(1))
        assert pod["automountServiceAccountToken"] is False
        container = only_container(obj)
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        assert "memory" in container["resources"]["limits"], obj["metadata"]["name"]
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
        assert mounts.get("tmp") == "/tmp", obj["metadata"]["name"]
        assert set(mounts) == {v["name"] for v in pod.get("volumes", [])}, obj["metadata"]["name"]
    # `serve` writes PROMETHEUS_MULTIPROC_DIR under LEADSCORE_VAR_DIR: writable on a read-only root.
    var_dir = re.search(r"LEADSCORE_VAR_DIR=(\S+)", (REPO_ROOT / "Dockerfile").read_text())
    assert var_dir
    api_mounts = {m["mountPath"] for m in only_container(k8s_object("Deployment", API_DEPLOYMENT))["volumeMounts"]}
    assert var_dir.group(1) in api_mounts


def test_migration_job_runs_once_before_the_rollout() -> None:
    job = k8s_object("Job", "leadscore-migrate")
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] <= 3
    assert "ttlSecondsAfterFinished" not in job["spec"], "a re-apply of the same release must not re-run it"
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "migrate"


def test_the_documented_pre_rollout_selector_applies_the_job_and_what_it_needs() -> None:
    selector = "app.kubernetes.io/component notin (api, worker)"
    assert f"kubectl apply -k deploy/k8s -l '{selector}'" in (REPO_ROOT / "README.md").read_text()
    # `notin` also selects objects without the label.
    picked = {
        (o["kind"], o["metadata"]["name"])
        for o in k8s_objects()
        if o["kind"] != "Secret"
        and o["metadata"].get("labels", {}).get("app.kubernetes.io/component") not in ("api", "worker")
    }
    assert picked == {("Namespace", "leadscore"), ("ConfigMap", "leadscore-config"), ("Job", "leadscore-migrate")}
