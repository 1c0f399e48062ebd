"""Checks of the Docker deployment: docker-compose.yml, deploy/Dockerfile.* and deploy/models.toml.

The structural tests read the files with PyYAML (a dependency of transformers, so always there).
The last test hands the compose file to the real Compose tools that are installed (Debian's
docker-compose v1, and the `docker compose` v2 plugin where present); neither needs an engine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from genq.shared.registry import load_registry

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
MODELS_TOML = DEPLOY / "models.toml"

# The deployment settings of docs/configuration.md: the only GENQ_ settings a deployment sets.
CONTRACT_VARS = {
    "GENQ_DATABASE_URL",
    "GENQ_BROKER_URL",
    "GENQ_STORAGE_URL",
    "GENQ_S3_ENDPOINT",
    "GENQ_S3_ACCESS_KEY",
    "GENQ_S3_SECRET_KEY",
    "GENQ_S3_SECURE",
    "GENQ_MODELS_FILE",
    "GENQ_AUTH",
}
INFRA = ("redis", "postgres", "minio")
GENQ_SERVICES = ("migrate", "api", "worker-gpt2", "worker-sd15")
REQUIRED_SERVICES = {*INFRA, "minio-init", *GENQ_SERVICES}
EXPECTED_WORKERS = {"worker-gpt2": ("gpt2", "0"), "worker-sd15": ("sd15", "1")}


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert "version" not in data, "use the version-less Compose Specification"
    return data["services"]


def _workers(services: dict[str, Any]) -> dict[str, Any]:
    return {name: svc for name, svc in services.items() if name.startswith("worker")}


def _gpu_devices(svc: dict[str, Any]) -> list[dict[str, Any]]:
    return svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def _flag(command: list[str], flag: str) -> str:
    assert flag in command, f"{command} has no {flag}"
    return str(command[command.index(flag) + 1])


def _env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    assert isinstance(env, dict), "environment is written as a mapping"
    return {k: str(v) for k, v in env.items()}


def _dockerfile(svc: dict[str, Any]) -> Path:
    build = svc["build"]
    return ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")


def test_all_services_present(services: dict[str, Any]) -> None:
    assert REQUIRED_SERVICES <= set(services), REQUIRED_SERVICES - set(services)


def test_infrastructure_has_healthchecks_and_pinned_majors(services: dict[str, Any]) -> None:
    for name in INFRA:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert services["redis"]["image"] == "redis:7"
    assert services["postgres"]["image"] == "postgres:16"
    pg_env = _env(services["postgres"])
    assert pg_env["POSTGRES_DB"] == "genq" and pg_env["POSTGRES_USER"] == "genq"


def test_api_and_workers_wait_for_healthy_services_and_migrations(services: dict[str, Any]) -> None:
    for name in ("api", *EXPECTED_WORKERS):
        deps = services[name]["depends_on"]
        for infra in ("redis", "postgres"):
            assert deps[infra]["condition"] == "service_healthy", (name, infra)
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["minio-init"]["condition"] == "service_completed_successfully", name
    assert services["migrate"]["command"] == ["genq", "db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "8000:8000" in [str(p) for p in services["api"]["ports"]]


def test_workers_reserve_distinct_nvidia_gpus(services: dict[str, Any]) -> None:
    workers = _workers(services)
    assert set(EXPECTED_WORKERS) <= set(workers)
    seen: list[str] = []
    for name, svc in workers.items():
        devices = _gpu_devices(svc)
        assert devices, f"{name} reserves no GPU"
        for dev in devices:
            assert dev["driver"] == "nvidia", name
            assert "gpu" in dev["capabilities"], name
            assert "count" not in dev, f"{name}: pin GPUs with device_ids, not count"
            seen += [str(i) for i in dev["device_ids"]]
    assert len(seen) == len(set(seen)), f"two workers reserve the same GPU: {seen}"
    for name, (_, gpu) in EXPECTED_WORKERS.items():
        assert [str(i) for d in _gpu_devices(services[name]) for i in d["device_ids"]] == [gpu]


def test_worker_gpu_flag_selects_a_reserved_device(services: dict[str, Any]) -> None:
    # The NVIDIA runtime shows a container only its reserved GPUs, renumbered from 0, and
    # `--gpu N` sets CUDA_VISIBLE_DEVICES=N inside it: N must index the reserved list, so a
    # worker pinned to host GPU 1 passes --gpu 0.
    registry = load_registry(MODELS_TOML)
    for name, svc in _workers(services).items():
        command = [str(c) for c in svc["command"]]
        reserved = [i for d in _gpu_devices(svc) for i in d["device_ids"]]
        gpu = int(_flag(command, "--gpu"))
        assert 0 <= gpu < len(reserved), f"{name}: --gpu {gpu} is not one of its {len(reserved)} GPUs"
        for model in _flag(command, "--models").split(","):
            assert model in registry, f"{name} serves {model!r}, not in deploy/models.toml"
    for name, (model, _) in EXPECTED_WORKERS.items():
        assert _flag([str(c) for c in services[name]["command"]], "--models") == model


def test_only_contract_genq_variables_are_used() -> None:
    texts = [COMPOSE.read_text(), *(p.read_text() for p in DEPLOY.glob("Dockerfile.*"))]
    used = {m for text in texts for m in re.findall(r"\bGENQ_[A-Z0-9_]+", text)}
    assert used, "no GENQ_ settings found"
    assert used <= CONTRACT_VARS, \
        f"not among the deployment settings of docs/configuration.md: {sorted(used - CONTRACT_VARS)}"


def test_genq_settings_point_at_the_compose_services(services: dict[str, Any]) -> None:
    buckets = services["minio-init"]["command"]
    for name in GENQ_SERVICES:
        env = _env(services[name])
        assert CONTRACT_VARS <= set(env), f"{name} lacks {sorted(CONTRACT_VARS - set(env))}"
        db = urlsplit(env["GENQ_DATABASE_URL"])
        assert db.scheme == "postgresql+psycopg" and db.hostname == "postgres", name
        assert db.username == "genq" and db.path == "/genq" and db.port == 5432, name
        assert urlsplit(env["GENQ_BROKER_URL"]).hostname == "redis", name
        assert env["GENQ_S3_ENDPOINT"].split(":")[0] == "minio", name
        assert env["GENQ_S3_SECURE"] == "false", name
        bucket = urlsplit(env["GENQ_STORAGE_URL"]).netloc
        assert env["GENQ_STORAGE_URL"] == "s3://genq-outputs" and f"/{bucket}" in str(buckets), name
        assert env["GENQ_S3_ACCESS_KEY"] == _env(services["minio"])["MINIO_ROOT_USER"], name
        assert env["GENQ_S3_SECRET_KEY"] == _env(services["minio"])["MINIO_ROOT_PASSWORD"], name
        mounts = [str(v) for v in services[name].get("volumes", [])]
        assert f"./deploy/models.toml:{env['GENQ_MODELS_FILE']}:ro" in mounts, name


def test_dockerfiles_exist_and_run_genq_as_non_root(services: dict[str, Any]) -> None:
    built = {name: _dockerfile(svc) for name, svc in services.items() if "build" in svc}
    assert set(GENQ_SERVICES) <= set(built)
    for name, path in built.items():
        assert path.is_file(), f"{name}: {path} does not exist"
        users = re.findall(r"^USER\s+(\S+)", path.read_text(), flags=re.MULTILINE)
        assert users and users[-1] not in ("root", "0"), f"{path.name} must end as a non-root user"
    assert built["api"].name == "Dockerfile.api" and built["worker-gpt2"].name == "Dockerfile.worker"


def test_api_dockerfile_serves_port_8000_with_healthcheck() -> None:
    text = (DEPLOY / "Dockerfile.api").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, flags=re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, flags=re.MULTILINE)
    assert 'CMD ["genq", "api", "--host", "0.0.0.0", "--port", "8000"]' in text


def test_worker_dockerfile_is_cuda_with_model_cache_volume(services: dict[str, Any]) -> None:
    text = (DEPLOY / "Dockerfile.worker").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-ubuntu", text, flags=re.MULTILINE)
    assert "python3.11" in text and "HF_HOME=/models" in text
    assert 'ENTRYPOINT ["genq", "worker"]' in text
    for name, svc in _workers(services).items():
        volumes = [str(v) for v in svc["volumes"]]
        assert any(v.endswith(":/models") for v in volumes), f"{name} has no model cache volume"


def test_models_toml_is_a_valid_registry() -> None:
    registry = load_registry(MODELS_TOML)
    assert set(registry.names()) == {"gpt2", "sd15"}
    gpt2, sd15 = registry.get("gpt2"), registry.get("sd15")
    assert gpt2 is not None and (gpt2.kind, gpt2.source, gpt2.options.max_batch_size) == ("text", "gpt2", 32)
    assert sd15 is not None and sd15.kind == "image" and sd15.options.max_batch_size == 4
    assert sd15.source == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def _compose_tools() -> list[list[str]]:
    """The Compose CLIs installed here; `docker compose` only when the plugin answers."""
    tools = []
    if shutil.which("docker-compose"):
        tools.append(["docker-compose"])
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60, check=False)
        if probe.returncode == 0:
            tools.append(["docker", "compose"])
    return tools


def test_compose_tools_accept_the_file() -> None:
    tools = _compose_tools()
    if not tools:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    # A host's own settings must not change what is checked; set one secret to see it flow
    # through the interpolation into both the Postgres service and the genq URL.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "POSTGRES_", "MINIO_"))}
    env["POSTGRES_PASSWORD"] = "from-env-123"
    for tool in tools:
        cmd = [*tool, "--project-directory", str(ROOT), "-f", str(COMPOSE), "config"]
        quiet = subprocess.run(
            [*cmd, "-q"], capture_output=True, text=True, env=env, timeout=120, check=False
        )
        assert quiet.returncode == 0, f"{' '.join(tool)} config -q: {quiet.stderr}"
        full = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
        assert full.returncode == 0, full.stderr
        resolved = yaml.safe_load(full.stdout)["services"]
        assert _env(resolved["postgres"])["POSTGRES_PASSWORD"] == "from-env-123"
        for name in GENQ_SERVICES:
            assert urlsplit(_env(resolved[name])["GENQ_DATABASE_URL"]).password == "from-env-123"
