"""The deployment files (docker-compose.yml, docker/*, .dockerignore) checked against the code.

No Docker engine is needed: the compose file is parsed with PyYAML and every name it uses
(environment variables, commands, ports, health-check routes, Dockerfiles) is looked up in
the settings class, the CLI and the app.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from embedseg_service.records.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
SERVICES = {"api", "worker", "redis", "postgres", "migrate", "object-store"}
OUR_SERVICES = ("migrate", "api", "worker")


@pytest.fixture(scope="module")
def compose() -> dict:
    with COMPOSE.open() as handle:
        return yaml.safe_load(handle)


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


@pytest.fixture(scope="module")
def openapi_paths() -> set[str]:
    from embedseg_service.api.app import create_app

    return set(create_app().openapi()["paths"])


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", ...]
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _command(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _option(argv: list[str], name: str) -> str:
    index = argv.index(name)
    return argv[index + 1]


def _cli_parser(pyproject: dict) -> argparse.ArgumentParser:
    """The `embedseg` sub-commands plugged in by pyproject's entry points, on a fresh parser."""
    parser = argparse.ArgumentParser(prog="embedseg", exit_on_error=False)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, target in pyproject["project"]["entry-points"]["embedseg.commands"].items():
        module_name, function_name = target.split(":")
        register = getattr(importlib.import_module(module_name), function_name)
        register(subparsers)
        assert name in subparsers.choices, f"{target} did not register the sub-command {name!r}"
    return parser


def _check_cli(argv: list[str], pyproject: dict) -> argparse.Namespace:
    assert argv[0] == "embedseg"
    assert argv[0] in pyproject["project"]["scripts"]
    try:
        return _cli_parser(pyproject).parse_args(argv[1:])
    except SystemExit as exc:  # argparse reports some errors by exiting
        raise AssertionError(f"`{shlex.join(argv)}` is not a valid embedseg command line") from exc


def _dockerfile_cmd(path: Path) -> list[str]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("CMD ")]
    assert len(lines) == 1, f"{path.name} must have exactly one exec-form CMD"
    return json.loads(lines[0][len("CMD ") :])


def test_compose_has_every_service_and_named_volume(compose: dict) -> None:
    assert SERVICES <= set(compose["services"])
    declared = set(compose["volumes"])
    used = set()
    for service in compose["services"].values():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if not source.startswith((".", "/", "~")):
                used.add(source)
    assert used == declared, "every named volume is declared once and used"
    assert compose["services"]["postgres"]["volumes"][0].split(":")[1] == "/var/lib/postgresql/data"


def test_every_embedseg_env_name_is_a_settings_field(compose: dict) -> None:
    fields = set(Settings.model_fields)
    for name, service in compose["services"].items():
        for key in _env(service):
            if key.startswith("EMBEDSEG_"):
                field = key.removeprefix("EMBEDSEG_").lower()
                assert field in fields, f"{name}: {key} is not a field of embedseg_service.records.settings.Settings"


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_compose_environment_makes_valid_settings(compose: dict, name: str, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env file
    for key in [key for key in os.environ if key.startswith("EMBEDSEG_")]:
        monkeypatch.delenv(key)
    env = _env(compose["services"][name])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.database_url_resolved.startswith("postgresql+psycopg://")
    assert urlsplit(settings.database_url_resolved).hostname == "postgres"
    assert urlsplit(settings.broker_url).hostname == "redis"
    assert not settings.embedded
    assert settings.storage_url is not None and settings.storage_dir is None  # no storage folder
    assert settings.cache_path.is_absolute()


def test_the_object_store_is_the_seaweedfs_service_with_the_services_credentials(compose: dict) -> None:
    services = compose["services"]
    store = services["object-store"]
    assert store["image"].split(":")[0] == "chrislusf/seaweedfs"
    argv = _command(store)
    assert argv[0] == "server" and "-s3" in argv and "-master.telemetry=false" in argv
    port = int(next(arg for arg in argv if arg.startswith("-s3.port=")).split("=", 1)[1])
    health = " ".join(store["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port}/healthz" in health
    assert [mount.split(":")[1] for mount in store["volumes"]] == ["/data"]
    credentials = _env(store)
    assert set(credentials) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for name in OUR_SERVICES:
        env = _env(services[name])
        assert {key: env[key] for key in credentials} == credentials, f"{name} signs with the store's identity"
        endpoint = urlsplit(env["EMBEDSEG_S3_ENDPOINT_URL"])
        assert (endpoint.hostname, endpoint.port) == ("object-store", port)
        assert env["EMBEDSEG_STORAGE_URL"].startswith("s3://")


def test_services_share_one_configuration(compose: dict) -> None:
    envs = [_env(compose["services"][name]) for name in OUR_SERVICES]
    assert envs[0] == envs[1] == envs[2]
    postgres_env = _env(compose["services"]["postgres"])
    url = urlsplit(envs[0]["EMBEDSEG_DATABASE_URL"])
    assert url.username == postgres_env["POSTGRES_USER"]
    assert url.password == postgres_env["POSTGRES_PASSWORD"]
    assert url.path == "/" + postgres_env["POSTGRES_DB"]
    assert url.port == 5432


def test_api_and_worker_share_no_storage_volume(compose: dict) -> None:
    """Files go through the object store only: the API and the worker mount no volume in common, each
    keeps its cache on a volume of its own, and no service but the object store mounts its data."""
    services = compose["services"]
    mounts = {name: [mount.split(":") for mount in services[name].get("volumes", [])] for name in services}
    api_volumes = {source for source, _ in mounts["api"]}
    worker_volumes = {source for source, _ in mounts["worker"]}
    assert api_volumes and worker_volumes and not api_volumes & worker_volumes
    for name in ("api", "worker"):
        cache = Path(_env(services[name])["EMBEDSEG_CACHE_DIR"])
        ((_, target),) = mounts[name]
        assert cache == Path(target) or Path(target) in cache.parents, f"{name}: the cache is on its volume"
        assert not [key for key in _env(services[name]) if key in ("EMBEDSEG_STORAGE_DIR", "EMBEDSEG_DATA_DIR")]
    (store_volume,) = {source for source, _ in mounts["object-store"]}
    assert [name for name, items in mounts.items() if store_volume in {source for source, _ in items}] == [
        "object-store"
    ]


def test_commands_are_real_cli_sub_commands(compose: dict, pyproject: dict) -> None:
    services = compose["services"]
    migrate = _command(services["migrate"])
    assert migrate[:3] == ["embedseg", "db", "upgrade"]
    _check_cli(migrate, pyproject)
    _check_cli(_command(services["api"]), pyproject)
    worker = _check_cli(_command(services["worker"]), pyproject)
    assert worker.command == "worker"
    assert _option(_command(services["worker"]), "--queues") == _env(services["worker"])["EMBEDSEG_GPU_QUEUE"]


def test_dockerfile_default_commands_are_real_cli_sub_commands(compose: dict, pyproject: dict) -> None:
    for name in ("api", "worker"):
        dockerfile = ROOT / compose["services"][name]["build"]["dockerfile"]
        assert _dockerfile_cmd(dockerfile) == _command(compose["services"][name])
        _check_cli(_dockerfile_cmd(dockerfile), pyproject)


def test_api_port_is_published_and_matches_serve(compose: dict) -> None:
    api = compose["services"]["api"]
    argv = _command(api)
    port = int(_option(argv, "--port"))
    assert _option(argv, "--host") == "0.0.0.0"
    published = [str(item).split(":") for item in api["ports"]]
    assert [int(item[-1]) for item in published] == [port]
    assert [item[0] for item in published] == ["127.0.0.1"], "the API is published on loopback only"
    exposed = re.search(r"^EXPOSE (\d+)$", (ROOT / "docker/Dockerfile.api").read_text(), re.M)
    assert int(exposed.group(1)) == port


def test_healthchecks_target_real_routes_and_services(compose: dict, openapi_paths: set[str]) -> None:
    services = compose["services"]
    api_check = " ".join(services["api"]["healthcheck"]["test"])
    urls = re.findall(r"http://[^'\" ]+", api_check)
    assert len(urls) == 1
    url = urlsplit(urls[0])
    assert url.hostname in {"127.0.0.1", "localhost"}
    assert url.port == int(_option(_command(services["api"]), "--port"))
    assert url.path in openapi_paths
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    pg_check = services["postgres"]["healthcheck"]["test"]
    assert "pg_isready" in pg_check
    assert _option(pg_check, "-U") == _env(services["postgres"])["POSTGRES_USER"]


def test_worker_healthcheck_pings_the_celery_app_of_the_project(compose: dict) -> None:
    from celery import Celery

    test = compose["services"]["worker"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    argv = shlex.split(test[1])
    assert argv[0] == "celery" and argv[3:5] == ["inspect", "ping"]
    module = importlib.import_module(_option(argv, "-A"))
    assert isinstance(module.app, Celery)
    # Compose turns $$ into $; the shell then names this container's default Celery node.
    assert _option(argv, "--destination") == "celery@$$HOSTNAME"


def test_startup_order(compose: dict) -> None:
    services = compose["services"]
    assert services["migrate"].get("restart") == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["object-store"]["condition"] == "service_healthy"


def test_worker_scales_and_reserves_a_gpu(compose: dict) -> None:
    worker = compose["services"]["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_dockerfiles_exist_and_copy_existing_paths(compose: dict) -> None:
    for name in OUR_SERVICES:
        build = compose["services"][name]["build"]
        assert build["context"] == "."
        dockerfile = ROOT / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {build['dockerfile']} does not exist"
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"


def test_images_install_the_pinned_torch_build(pyproject: dict) -> None:
    from packaging.requirements import Requirement

    torch_pin = next(Requirement(dep) for dep in pyproject["project"]["dependencies"] if dep.startswith("torch"))
    api = (ROOT / "docker/Dockerfile.api").read_text()
    worker = (ROOT / "docker/Dockerfile.worker").read_text()
    for text in (api, worker):
        version = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M).group(1)
        assert torch_pin.specifier.contains(version), f"torch {version} is outside {torch_pin}"
        assert text.index("download.pytorch.org/whl/") < text.index("pip install ."), "torch before the project"
    assert "download.pytorch.org/whl/cpu" in api
    assert re.search(r"^FROM nvidia/cuda:[\d.]+-cudnn-runtime-", worker, re.M)
    assert re.search(r"^ARG TORCH_CUDA=cu\d+$", worker, re.M)


def test_dockerignore_keeps_local_state_out_but_not_the_sources() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for local in (".git", ".venv", "embedseg-data"):
        assert local in patterns
    for source in ("core", "api", "worker", "migrations", "pyproject.toml", "README.md"):
        assert source not in patterns and source + "/" not in patterns


def test_ci_requires_the_production_services(monkeypatch: pytest.MonkeyPatch) -> None:
    """``.ci/run`` stops when Redis or PostgreSQL is down and makes their tests fail rather than skip."""
    from helpers import service_missing

    ci = (ROOT / ".ci" / "run").read_text()
    assert "export EMBEDSEG_REQUIRE_SERVICES=1" in ci
    assert "did not come up" in ci
    monkeypatch.setenv("EMBEDSEG_REQUIRE_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception, match="Redis is down"):
        service_missing("Redis is down")
    monkeypatch.delenv("EMBEDSEG_REQUIRE_SERVICES")
    with pytest.raises(pytest.skip.Exception, match="Redis is down"):
        service_missing("Redis is down")


# --------------------------------------------------------------------------- the worker-only host

WORKER_HOST = ROOT / "docker" / "compose.worker-host.yml"
CONNECTION = ("EMBEDSEG_DATABASE_URL", "EMBEDSEG_BROKER_URL", "EMBEDSEG_STORAGE_URL", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY")  # fmt: skip
"""What a worker host joins: given by the environment, never written in the file."""
SAMPLE = {
    "EMBEDSEG_DATABASE_URL": "postgresql+psycopg://embedseg:secret@db.lab.example:5432/embedseg",
    "EMBEDSEG_BROKER_URL": "redis://broker.lab.example:6379/0",
    "EMBEDSEG_STORAGE_URL": "s3://embedseg/storage",
    "EMBEDSEG_S3_ENDPOINT_URL": "http://s3.lab.example:8333",
    "AWS_ACCESS_KEY_ID": "embedseg",
    "AWS_SECRET_ACCESS_KEY": "secret",
}
INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def _interpolate(value: str, env: dict[str, str]) -> str:
    """``value`` with ``${NAME}``, ``${NAME:-default}`` and ``${NAME:?error}`` replaced as Compose does
    (``$$`` is left for the container's shell); a missing required variable raises ``KeyError``."""

    def one(match: re.Match[str]) -> str:
        name, operator, word = match.group(1), match.group(2) or "", match.group(3) or ""
        if env.get(name):
            return env[name]
        if operator.endswith("?"):
            raise KeyError(f"{name}: {word}")
        return word if operator.endswith("-") else ""

    return INTERPOLATION.sub(one, value)


@pytest.fixture(scope="module")
def worker_host() -> dict:
    with WORKER_HOST.open() as handle:
        return yaml.safe_load(handle)


def test_worker_host_runs_only_a_worker_that_joins_the_deployment_given_by_the_environment(
    worker_host: dict, compose: dict
) -> None:
    assert set(worker_host["services"]) == {"worker"}, "no database, broker, object store or API of its own"
    worker = worker_host["services"]["worker"]
    assert "depends_on" not in worker and "ports" not in worker
    env = _env(worker)
    for name in CONNECTION:
        assert re.fullmatch(rf"\$\{{{name}:\?[^}}]+\}}", env[name]), f"{name} must be required from the environment"
    for key in env:
        if key.startswith("EMBEDSEG_"):
            assert key.removeprefix("EMBEDSEG_").lower() in Settings.model_fields, key
    with pytest.raises(KeyError, match="EMBEDSEG_DATABASE_URL"):
        _interpolate(env["EMBEDSEG_DATABASE_URL"], {})
    # the defaults of the values that must agree with the main deployment are the main deployment's
    main = _env(compose["services"]["worker"])
    for key in ("EMBEDSEG_GPU_QUEUE", "EMBEDSEG_MAX_JOB_MINUTES", "EMBEDSEG_JOB_VISIBILITY_TIMEOUT_S"):
        assert _interpolate(env[key], {}) == main[key], key


def test_worker_host_environment_makes_valid_settings(worker_host: dict, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env file
    for key in [key for key in os.environ if key.startswith("EMBEDSEG_")]:
        monkeypatch.delenv(key)
    for key, value in _env(worker_host["services"]["worker"]).items():
        monkeypatch.setenv(key, _interpolate(value, SAMPLE))
    settings = Settings()
    assert settings.database_url_resolved == SAMPLE["EMBEDSEG_DATABASE_URL"]
    assert settings.broker_url == SAMPLE["EMBEDSEG_BROKER_URL"] and not settings.embedded
    assert settings.storage_url == SAMPLE["EMBEDSEG_STORAGE_URL"] and settings.storage_dir is None
    assert settings.s3_endpoint_url == SAMPLE["EMBEDSEG_S3_ENDPOINT_URL"]
    assert os.environ["AWS_ACCESS_KEY_ID"] == SAMPLE["AWS_ACCESS_KEY_ID"]
    cache = settings.cache_path
    ((source, target),) = [mount.split(":") for mount in worker_host["services"]["worker"]["volumes"]]
    assert cache == Path(target) or Path(target) in cache.parents, "the cache is on the host's volume"
    assert set(worker_host["volumes"]) == {source}
    monkeypatch.delenv("EMBEDSEG_S3_ENDPOINT_URL")  # unset: AWS S3
    assert Settings().s3_endpoint_url is None


def test_worker_host_runs_one_worker_per_gpu_of_the_worker_image(worker_host: dict, compose: dict, pyproject) -> None:
    from embedseg_service.worker.gpus import ALL, node_name

    worker = worker_host["services"]["worker"]
    argv = [_interpolate(part, {}) for part in _command(worker)]
    args = _check_cli(argv, pyproject)
    assert (args.command, args.gpus, args.queues) == ("worker", ALL, "gpu")
    assert _check_cli([_interpolate(part, {"WORKER_QUEUES": "gpu,gpu-large"}) for part in _command(worker)],
                      pyproject).queues == "gpu,gpu-large"  # fmt: skip
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    # the image and the Dockerfile of the main deployment's worker, built from the repository root
    assert worker["image"] == compose["services"]["worker"]["image"]
    assert worker["build"]["dockerfile"] == compose["services"]["worker"]["build"]["dockerfile"]
    assert (WORKER_HOST.parent / worker["build"]["context"]).resolve() == ROOT
    # the health check pings the node of the first GPU's child (Celery turns %h into the container's host name)
    test = worker["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    ping = shlex.split(test[1])
    assert ping[:3] == ["celery", "-A", "embedseg_service.worker.celery_app"] and ping[3:5] == ["inspect", "ping"]
    assert _option(ping, "--destination") == node_name(args.hostname, 0).replace("%h", "$$HOSTNAME")
    assert worker["stop_grace_period"] == compose["services"]["worker"]["stop_grace_period"]
    assert worker["restart"] == "unless-stopped"
