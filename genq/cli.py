"""The `genq` command: services (api, worker, up), client commands and admin tasks."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from genq import __version__
from genq.client import ClientSettings


def _settings() -> Any:
    from genq.shared.config import ConfigError, get_settings

    try:
        return get_settings()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class _Commands(click.Group):
    """The client library raises its own GenqError; here it becomes a one-line command error."""

    def invoke(self, ctx: click.Context) -> Any:
        from genq.client import GenqError

        try:
            return super().invoke(ctx)
        except GenqError as exc:
            raise click.ClickException(exc.message) from None


@click.group(cls=_Commands)
@click.version_option(__version__, prog_name="genq")
def main() -> None:
    """genq: a distributed job queue for generative models."""


# --- services ----------------------------------------------------------------------------------

@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="API processes serving the port (each with its own event loop, threads and database pool).")
@click.option("--log-level", default="info", show_default=True)
def api(host: str, port: int, workers: int, log_level: str) -> None:
    """Run the HTTP API service (applies database migrations first)."""
    import uvicorn

    from genq.services.app import create_app

    _logging(log_level)
    settings = _settings()
    if workers == 1:
        uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)
        return
    from genq.shared.migrate import upgrade

    upgrade(settings.database_url)  # once, before the processes start side by side
    # uvicorn starts each process from an import string; each builds its app from the environment.
    uvicorn.run("genq.services.app:create_replica", factory=True, workers=workers, host=host, port=port,
                log_level=log_level)


@main.command()
@click.option("--models", required=True, help="Comma-separated model names to serve, e.g. gpt2,tiny-gpt2.")
@click.option("--gpu", type=int, default=None, help="Pin to this GPU (sets CUDA_VISIBLE_DEVICES).")
@click.option("--concurrency", type=int, default=None,
              help="Jobs held at once, in threads. Default: twice the largest max_batch_size of the models "
                   "that batch (so the next batch is ready when one ends), else 1.")
@click.option("--memory-budget", default=None,
              help="Bytes of loaded models to keep (e.g. 20GiB, 512MiB; 0 for no limit). auto: 90% of the "
                   "GPU's memory, or half the RAM on the CPU. Least recently used models are unloaded. "
                   "[default: GENQ_WORKER_MEMORY_BUDGET, else auto]")
@click.option("--lease", type=float, default=None,
              help="Seconds a job's lease lasts between heartbeats; a dead worker's job is recovered after it. "
                   "[default: GENQ_WORKER_LEASE_S, else 30]")
@click.option("--max-attempts", type=int, default=None,
              help="Starts of one job before it is failed (protects against jobs that crash workers). "
                   "[default: GENQ_WORKER_MAX_ATTEMPTS, else 3]")
@click.option("--work", type=click.Choice(["both", "inference", "training"]), default=None,
              help="The jobs taken: inference on the models, their fine-tuning jobs (training), or both. "
                   "[default: GENQ_WORKER_WORK, else both]")
@click.option("--checkpoint-every", type=int, default=None,
              help="Fine-tuning steps between checkpoints. [default: GENQ_WORKER_CHECKPOINT_EVERY, else 50]")
@click.option("--log-level", default="info", show_default=True)
def worker(models: str, gpu: int | None, concurrency: int | None, memory_budget: str | None, lease: float | None,
           max_attempts: int | None, work: str | None, checkpoint_every: int | None, log_level: str) -> None:
    """Run a worker consuming the queues of MODELS."""
    # Pin the GPU before anything imports torch: CUDA reads this once, at initialisation.
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    assert "torch" not in sys.modules, "torch was imported before the GPU was pinned"
    from pydantic import ValidationError

    from genq.shared.registry import RegistryError
    from genq.workers.app import run_worker
    from genq.workers.settings import WorkerSettings

    _logging(log_level)
    names = [m.strip() for m in models.split(",") if m.strip()]
    given = {"concurrency": concurrency, "memory_budget": memory_budget, "lease_s": lease, "max_attempts": max_attempts,
             "work": work, "checkpoint_every": checkpoint_every}
    try:
        worker_settings = WorkerSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        option = {"memory_budget": "--memory-budget", "lease_s": "--lease"}.get(str(err["loc"][0]),
                                                                               f"--{err['loc'][0]}".replace("_", "-"))
        raise click.BadParameter(err["msg"].removeprefix("Value error, "), param_hint=option) from None
    try:
        run_worker(_settings(), names, worker_settings, loglevel=log_level.upper())
    except (ValueError, RegistryError, OSError) as exc:
        raise click.ClickException(f"worker could not start: {exc}") from None


def _die_with_parent() -> None:
    """In a child before exec (Linux): the kernel stops it if `genq up` itself is killed."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _child(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, preexec_fn=_die_with_parent if sys.platform == "linux" else None)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--models", default=None, help="Models to start workers for (default: every registered model).")
def up(host: str, port: int, models: str | None) -> None:
    """Run the whole stack on this machine: the API plus one worker per model."""
    from genq.shared.migrate import upgrade
    from genq.shared.registry import load_registry

    settings = _settings()
    names = models.split(",") if models else load_registry(settings.models_file).names()
    upgrade(settings.database_url)  # once, before the processes start side by side
    exe = [sys.executable, "-m", "genq"]
    procs = [_child([*exe, "api", "--host", host, "--port", str(port)])]
    procs += [_child([*exe, "worker", "--models", name]) for name in names]
    click.echo(f"genq up: API on http://{host}:{port}, workers for {', '.join(names)} (Ctrl-C stops)")

    def stop(*_: Any) -> None:
        for p in procs:
            if p.poll() is None:
                p.terminate()

    signal.signal(signal.SIGTERM, stop)
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        failed = [p.args for p in procs if p.poll() not in (None, 0)]
        if failed:
            click.echo(f"genq up: a process exited: {failed[0]}", err=True)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


# --- client commands ---------------------------------------------------------------------------

api_option = click.option("--api", "api_url", default=None,
                          help=f"genq API base URL [default: GENQ_API_URL, else {ClientSettings().api_url}].")


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--wait", is_flag=True, help="Show a progress bar until the batch finishes.")
@api_option
def submit(file: Path, wait: bool, api_url: str) -> None:
    """Submit a JSONL file of request lines as one batch; prints the batch id."""
    from genq.client import Client

    client = Client.from_settings(api_url=api_url)
    batch = client.submit_file(file)
    click.echo(batch["id"])
    if wait:
        batch = client.wait_batch(batch["id"], progress=True)
        counts = batch["request_counts"]
        click.echo(f"{batch['id']} {batch['status']}: {counts['completed']} completed, "
                   f"{counts['failed']} failed, {counts.get('cancelled', 0)} cancelled of {counts['total']}")
        if batch["status"] != "completed":
            sys.exit(1)


@main.command()
@click.argument("ident")
@api_option
def status(ident: str, api_url: str) -> None:
    """Show a batch or a job (by id) as JSON."""
    from genq.client import Client

    click.echo(json.dumps(Client.from_settings(api_url=api_url).get(ident), indent=2))


@main.command()
@click.argument("ident")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write to DIR/<id>.jsonl (or .json for a job) instead of standard output.")
@api_option
def results(ident: str, out: Path | None, api_url: str) -> None:
    """Fetch a batch's results (JSONL, input order) or a job's result."""
    from genq.client import Client

    client = Client.from_settings(api_url=api_url)
    if ident.startswith("batch_"):
        data = client.results(ident)
        name = f"{ident}.jsonl"
    else:
        data = json.dumps(client.get(ident), indent=2).encode() + b"\n"
        name = f"{ident}.json"
    if out is None:
        sys.stdout.buffer.write(data)
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
        click.echo(str(out / name))


@main.command()
@click.argument("ident")
@api_option
def cancel(ident: str, api_url: str) -> None:
    """Cancel a batch or a job."""
    from genq.client import Client

    obj = Client.from_settings(api_url=api_url).cancel(ident)
    click.echo(f"{obj['id']} {obj['status']}")


@main.group()
def adapters() -> None:
    """LoRA adapters: upload, list, delete."""


@adapters.command("create")
@click.argument("name")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--model", required=True, help="The registered model (text or image) the adapter is for.")
@api_option
def adapters_create(name: str, path: Path, model: str, api_url: str) -> None:
    """Upload the adapter at PATH (a directory with adapter_config.json and .safetensors weights, or a
    zip / tar.gz of one) as NAME; prints its id."""
    from genq.client import Client

    obj = Client.from_settings(api_url=api_url).create_adapter(name, model, path)
    click.echo(f"created adapter {obj['name']} for {obj['model']} (rank {obj['rank']}, {obj['bytes']} bytes): "
               f"{obj['id']}")


@adapters.command("list")
@click.option("--model", default=None, help="Only adapters for this model.")
@api_option
def adapters_list(model: str | None, api_url: str) -> None:
    """List your adapters and the registry's: id, name, model, owner, rank."""
    from genq.client import Client

    click.echo("id\tname\tmodel\towned_by\trank")
    for a in Client.from_settings(api_url=api_url).list_adapters(model):
        click.echo(f"{a['id']}\t{a['name']}\t{a['model']}\t{a['owned_by']}\t{a['rank'] if a['rank'] else '-'}")


@adapters.command("delete")
@click.argument("ident", metavar="ID")
@api_option
def adapters_delete(ident: str, api_url: str) -> None:
    """Delete an uploaded adapter and its files."""
    from genq.client import Client

    obj = Client.from_settings(api_url=api_url).delete_adapter(ident)
    click.echo(f"deleted adapter {obj['id']}")


# --- admin ---------------------------------------------------------------------------------------

@main.group()
def models() -> None:
    """Model registry tools."""


@models.command("build-tiny")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("var/models"),
              show_default=True)
def build_tiny(out: Path) -> None:
    """Write small random-weight models and LoRA adapters in Hugging Face format, plus DIR/models.toml."""
    from genq.workers.tiny import build_tiny as build
    from genq.workers.tiny_lora import build_tiny_adapters

    started = time.perf_counter()
    build(out)
    registry = build_tiny_adapters(out)
    click.echo(f"wrote tiny models and {registry} in {time.perf_counter() - started:.1f}s")


@models.command("list")
def list_models() -> None:
    """Print the configured registry."""
    from genq.shared.registry import load_registry

    for spec in load_registry(_settings().models_file).models.values():
        click.echo(f"{spec.name}\t{spec.kind}\t{spec.queue}\t{spec.source}")


@main.group()
def db() -> None:
    """Results database tools."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply the database migrations."""
    from genq.shared.migrate import upgrade

    settings = _settings()
    upgrade(settings.database_url)
    click.echo("database is up to date")


# --- API keys ------------------------------------------------------------------------------------

@main.group()
def keys() -> None:
    """API keys for GENQ_AUTH=required (stored hashed; a key is shown once, when it is made)."""


def _key_session() -> Any:
    from genq.shared.db import session_factory, session_scope
    from genq.shared.migrate import upgrade

    settings = _settings()
    upgrade(settings.database_url)  # the keys table may be the first thing a new install needs
    return session_scope(session_factory(settings.database_url))


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@keys.command("create")
@click.option("--tenant", required=True, help="The tenant the key acts for; it sees only that tenant's work.")
def keys_create(tenant: str) -> None:
    """Make an API key for TENANT; the key is the last word printed and is not shown again."""
    from genq.services.auth import create_key

    with _key_session() as session:
        try:
            row, key = create_key(session, tenant=tenant)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        key_id = row.id
    click.echo(f"key id {key_id}; store the key now, genq keeps only its hash")
    click.echo(f"created key for tenant {tenant}: {key}")


@keys.command("list")
@click.option("--tenant", default=None, help="Only this tenant's keys.")
def keys_list(tenant: str | None) -> None:
    """List keys: id, prefix, tenant, created and revoked times (never the keys themselves)."""
    from genq.services.auth import list_keys

    with _key_session() as session:
        rows = [(k.id, k.prefix, k.tenant, _when(k.created_at), _when(k.revoked_at))
                for k in list_keys(session, tenant=tenant)]
    click.echo("id\tprefix\ttenant\tcreated\trevoked")
    for row in rows:
        click.echo("\t".join(row))


@keys.command("revoke")
@click.argument("ident", metavar="PREFIX_OR_ID")
def keys_revoke(ident: str) -> None:
    """Revoke a key by its id or prefix. API processes may accept it for up to 30 s more (their cache)."""
    from genq.services.auth import revoke_key

    with _key_session() as session:
        try:
            row = revoke_key(session, ident)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        if row is None:
            raise click.ClickException(f"no key with id or prefix {ident!r}")
        key_id, prefix, owner, revoked = row.id, row.prefix, row.tenant, row.revoked_at
    click.echo(f"revoked key {key_id} ({prefix}..., tenant {owner}) at {_when(revoked)}")


if __name__ == "__main__":
    main()
