"""Settings and the model registry: defaults, and clear errors naming what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from genq.shared.config import EMBEDDED_BROKER_URL, ConfigError, build_settings
from genq.shared.registry import RegistryError, load_registry, parse_registry


def test_embedded_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("DATABASE_URL", "BROKER_URL", "STORAGE_URL", "MODELS_FILE", "AUTH"):
        monkeypatch.delenv(f"GENQ_{var}", raising=False)
    s = build_settings()
    assert s.database_url == "sqlite:///./var/genq.db"
    assert s.broker_url == EMBEDDED_BROKER_URL
    assert s.storage_url == "file://./var/objects" and s.auth == "off" and s.models_file is None


def test_env_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    reg = tmp_path / "m.toml"
    reg.write_text('[models.a]\nkind = "text"\nsource = "gpt2"\n')
    monkeypatch.setenv("GENQ_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("GENQ_MODELS_FILE", str(reg))
    monkeypatch.setenv("GENQ_S3_SECURE", "false")
    s = build_settings()
    assert s.broker_url == "redis://redis:6379/0" and s.models_file == reg and s.s3_secure is False


@pytest.mark.parametrize("var, value, words", [
    ("GENQ_DATABASE_URL", "mysql://x/y", "GENQ_DATABASE_URL: scheme 'mysql' is not supported"),
    ("GENQ_BROKER_URL", "kafka://x", "GENQ_BROKER_URL: scheme 'kafka'"),
    ("GENQ_STORAGE_URL", "gs://bucket", "GENQ_STORAGE_URL: scheme 'gs'"),
    ("GENQ_STORAGE_URL", "s3://", "GENQ_STORAGE_URL: s3:// needs a bucket"),
    ("GENQ_AUTH", "maybe", "GENQ_AUTH:"),
    ("GENQ_MODELS_FILE", "/nonexistent/models.toml", "GENQ_MODELS_FILE: /nonexistent/models.toml is not a file"),
    ("GENQ_S3_SECURE", "perhaps", "GENQ_S3_SECURE:"),
])
def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str, words: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as exc:
        build_settings()
    assert words in str(exc.value)


def test_s3_needs_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENQ_STORAGE_URL", "s3://genq-outputs")
    monkeypatch.delenv("GENQ_S3_ENDPOINT", raising=False)
    with pytest.raises(ConfigError, match="GENQ_S3_ENDPOINT"):
        build_settings()


def test_builtin_registry_names_contract_models() -> None:
    reg = load_registry(None)
    assert {"gpt2", "sd15", "tiny-gpt2", "tiny-sd"} <= set(reg.names())
    assert reg.get("gpt2").source == "gpt2" and reg.get("gpt2").kind == "text"
    assert reg.get("sd15").source == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert reg.get("tiny-gpt2").queue == "genq.tiny-gpt2"


def test_relative_source_is_resolved_against_the_file(tmp_path: Path) -> None:
    f = tmp_path / "models.toml"
    f.write_text('[models.m]\nkind = "text"\nsource = "./m"\nmax_batch_size = 4\nrevision = "main"\n')
    spec = load_registry(f).get("m")
    assert spec.source == str(tmp_path / "m") and spec.options.max_batch_size == 4
    assert spec.options.revision == "main"


@pytest.mark.parametrize("text, words", [
    ("[models.m]\nkind = 'video'\nsource = 'x'", "models.m.kind must be one of"),
    ("[models.m]\nkind = 'text'", "models.m.source"),
    ("[models.'Bad Name']\nkind = 'text'\nsource = 'x'", "must use only"),
    ("[models.m]\nkind = 'text'\nsource = 'x'\nmax_batch_size = 0", "max_batch_size must be a positive"),
    ("[models.m]\nkind = 'text'\nsource = 'x'\nmax_batchsize = 4", "max_batchsize is not an option of text models"),
    ("[models.m]\nkind = 'echo'\nsource = 'x'\nmax_adapters = 2", "max_adapters is not an option of echo models"),
    ("[models.m]\nkind = 'image'\nsource = 'x'\nmax_wait_ms = 'soon'", "max_wait_ms Input should be a valid number"),
    ("[models.m]\nkind = 'image'\nsource = 'x'\nsafety_checker = 'no'", "safety_checker Input should be a valid bool"),
    ("models = 3", "needs at least one"),
    ("[models.m\n", "not valid TOML"),
])
def test_registry_errors(text: str, words: str) -> None:
    with pytest.raises(RegistryError, match=words):
        parse_registry(text, Path("."), "test.toml")


def test_missing_registry_file(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="cannot read model registry"):
        load_registry(tmp_path / "nope.toml")


def test_worker_settings_come_from_the_environment_with_one_default_each(monkeypatch: pytest.MonkeyPatch) -> None:
    from genq.workers.settings import WorkerSettings

    for name in ("LEASE_S", "MAX_ATTEMPTS", "MEMORY_BUDGET", "CONCURRENCY"):
        monkeypatch.delenv(f"GENQ_WORKER_{name}", raising=False)
    default = WorkerSettings()
    assert (default.lease_s, default.max_attempts, default.budget_bytes(), default.concurrency) == (30.0, 3, None, None)
    monkeypatch.setenv("GENQ_WORKER_LEASE_S", "2.5")
    monkeypatch.setenv("GENQ_WORKER_MEMORY_BUDGET", "1KiB")
    assert (WorkerSettings().lease_s, WorkerSettings().budget_bytes()) == (2.5, 1024)
    assert WorkerSettings(lease_s=4).lease_s == 4  # an option given on the command line wins
    monkeypatch.setenv("GENQ_WORKER_MEMORY_BUDGET", "lots")
    with pytest.raises(ValueError, match="not a size"):
        WorkerSettings()


def test_a_worker_holds_held_batches_of_its_largest_model() -> None:
    from genq.workers.app import default_concurrency

    registry = parse_registry(
        "[models.t]\nkind = 'text'\nsource = 'gpt2'\nmax_batch_size = 8\n"
        "[models.i]\nkind = 'image'\nsource = 'x'\nmax_batch_size = 4\n"
        "[models.mix]\nkind = 'image'\nsource = 'x'\nmax_batch_size = 4\nheld_batches = 8\n"
        "[models.g]\nkind = 'gan'\nsource = 'x'\nmax_batch_size = 64\n", Path("."))
    assert default_concurrency(registry, ["t"]) == 16  # two batches: one runs, one is being prepared
    assert default_concurrency(registry, ["i"]) == 16  # images hold four: sizes and steps split the queue
    assert default_concurrency(registry, ["t", "mix"]) == 32
    assert default_concurrency(registry, ["g"]) == 16  # a GAN does not batch: PIPELINE_JOBS
