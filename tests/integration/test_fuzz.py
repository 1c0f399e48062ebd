"""Schemathesis against genq's own OpenAPI document: every operation, positive and negative data,
at least 1,000 cases in all, and not one 5xx.

The app runs in-process (ASGI) on real Postgres, file storage and an in-memory broker, so no worker
runs: the synchronous endpoints are never given a registered model (they would wait for a worker
and answer their documented 503), while `/v1/jobs` and `/v1/batches` often are, so that generated
requests get past the registry check and are recorded in Postgres. The figures go to
`var/fuzz-figures.json`.

Knobs: GENQ_FUZZ_EXAMPLES (cases per operation and mode, default 50), GENQ_FUZZ_SEED (default 0).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.servers import throwaway_database  # noqa: E402

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("GENQ_FUZZ_EXAMPLES", "50"))
SEED = int(os.environ.get("GENQ_FUZZ_SEED", "0"))
MIN_CASES = 1000
FIGURES = Path(__file__).resolve().parents[2] / "var" / "fuzz-figures.json"
# Operations whose bodies name a model and that record jobs without waiting for a worker.
MODEL_BODIES = {"POST /v1/jobs", "POST /v1/batches"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@schemathesis.serializer("application/x-ndjson")
def _ndjson(_ctx: Any, value: Any) -> bytes:
    """The document describes an NDJSON body as an array of request lines; send one a line."""
    items = value if isinstance(value, list) else [value]
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


@pytest.fixture(scope="module")
def fuzz_db() -> Iterator[str]:
    """A database of its own: generated jobs stay queued and must not reach the shared stack's API."""
    with throwaway_database(f"genq_fuzz_{uuid.uuid4().hex[:10]}") as url:
        yield url


@pytest.fixture(scope="module")
def fuzz_app(fuzz_db: str, tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from schemathesis.python import asgi

    from genq.services.app import create_app
    from genq.services.state import Limits
    from genq.shared.config import build_settings

    settings = build_settings(database_url=fuzz_db, broker_url="memory://", models_file=str(tiny_registry),
                              storage_url=f"file://{tmp_path_factory.mktemp('fuzz-storage')}")
    # Short waits: no worker runs, and a sync request that reached the queue must not hang the run.
    app = create_app(settings, limits=Limits(sync_start_timeout_s=0.05, sync_timeout_s=0.5), maintenance=False)
    yield app
    asgi.shutdown_lifespans()  # the lifespan schemathesis started for this app


def _with_models(case: Any, data: st.DataObject, models: dict[str, list[str]]) -> None:
    """Mostly put a registered model that serves the line's url into generated request lines."""
    def fix(line: Any) -> None:
        if not isinstance(line, dict) or not isinstance(line.get("body"), dict):
            return
        choice = data.draw(st.sampled_from([*models.get(line.get("url"), []), None]), label="model")
        if choice is not None:  # None, least often drawn: keep the generated (unregistered) name
            line["body"]["model"] = choice

    body = case.body
    if isinstance(body, list):  # NDJSON
        for line in body:
            fix(line)
    elif isinstance(body, dict):
        if isinstance(body.get("requests"), list):
            for line in body["requests"]:
                fix(line)
        else:
            fix(body)


def _order(op: Any) -> tuple[int, str]:
    """POSTs that create jobs, batches and files first, so later operations can be given real ids;
    DELETEs last, so they do not take those ids away."""
    method = op.method.upper()
    return (0 if method == "POST" and "{" not in op.path else 2 if method == "DELETE" else 1, op.label)


def test_openapi_fuzz_finds_no_server_error(fuzz_app: Any, tiny_registry: Path) -> None:
    from genq.shared.kinds import ENDPOINTS, served_by
    from genq.shared.registry import load_registry

    registry = load_registry(tiny_registry)
    models = {url: sorted(m.name for m in registry.models.values() if m.kind in served_by(url)) for url in ENDPOINTS}
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    operations = sorted((result.ok() for result in schema.get_all_operations()), key=_order)
    assert len(operations) >= 20, [op.label for op in operations]

    statuses: Counter[str] = Counter()
    per_operation: Counter[str] = Counter()
    media_types: Counter[str] = Counter()
    by_status: dict[str, Counter[str]] = {}
    server_errors: list[str] = []
    check_failures: dict[str, str] = {}
    unsatisfiable: list[str] = []
    created: dict[str, list[str]] = {"job_id": [], "batch_id": [], "file_id": []}
    began = time.monotonic()

    def with_real_ids(case: Any, data: st.DataObject, pool: dict[str, list[str]]) -> None:
        """Mostly aim path parameters at objects that exist (a live batch's event stream never ends)."""
        if case.operation.path.endswith("/events"):
            return
        for param, value in list((case.path_parameters or {}).items()):
            if ids := pool.get(param):
                case.path_parameters[param] = data.draw(st.sampled_from([*ids, value]), label=param)

    def remember(response: Any) -> None:
        try:
            ident = response.json().get("id", "")
        except Exception:  # noqa: BLE001 - not a JSON object
            return
        for param in created:
            if isinstance(ident, str) and ident.startswith(param.removesuffix("_id") + "_"):
                created[param].append(ident)

    def fuzz(op: Any, mode: GenerationMode) -> None:
        # A multipart file part is bytes whatever the generator meant it to be ("true" is a fine
        # file), so type mutations of an upload cannot be rejected; every other body can.
        multipart = "multipart/form-data" in op.get_request_payload_content_types()
        checks = CHECKS + ([negative_data_rejection] if mode.is_negative and not multipart else [])
        name = f"{op.label} [{mode.value}]"
        pool = {param: ids[-20:] for param, ids in created.items()}  # fixed for the run: hypothesis replays

        @seed(SEED)
        @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode), data=st.data())
        def run(case: Any, data: st.DataObject) -> None:
            if op.label in MODEL_BODIES and mode.is_positive:
                _with_models(case, data, models)
            with_real_ids(case, data, pool)
            per_operation[name] += 1
            if case.media_type:
                media_types[f"{op.label} {case.media_type}"] += 1
            try:
                response = case.call()
            except Exception as exc:  # noqa: BLE001 - the in-process transport re-raises what the app did not handle
                statuses["unhandled"] += 1
                server_errors.append(f"{name} -> unhandled {type(exc).__name__}: {str(exc)[:300]}\n"
                                     f"    {case.as_curl_command()[:600]}")
                return
            statuses[str(response.status_code)] += 1
            by_status.setdefault(name, Counter())[str(response.status_code)] += 1
            if response.status_code >= 500:
                server_errors.append(f"{name} -> {response.status_code} {response.text[:300]}\n"
                                     f"    {case.as_curl_command()[:600]}")
            elif response.status_code < 300:
                remember(response)
            try:
                case.validate_response(response, checks=checks)
            except FailureGroup as exc:
                for failure in exc.exceptions:
                    check_failures.setdefault(f"{name}: {failure.title}",
                                              f"{failure.message[:400]}\n    {case.as_curl_command()[:2000]}")

        try:
            run()
        except Unsatisfiable:
            unsatisfiable.append(name)  # no negative data exists for an operation without (constrained) inputs

    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(op, mode)

    cases = sum(per_operation.values())
    figures = {
        "schemathesis": schemathesis.__version__, "seed": SEED, "examples_per_operation_and_mode": EXAMPLES,
        "operations": len(operations), "cases_run": cases, "server_errors": len(server_errors),
        "created": {k: len(v) for k, v in created.items()},
        "check_failures": sorted(check_failures), "seconds": round(time.monotonic() - began, 1),
        "statuses": dict(sorted(statuses.items())), "request_media_types": dict(sorted(media_types.items())),
        "nothing_generated": unsatisfiable,
        "cases_per_operation": dict(sorted(per_operation.items())),
        "statuses_per_operation": {k: dict(sorted(v.items())) for k, v in sorted(by_status.items())},
    }
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    FIGURES.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps({k: v for k, v in figures.items() if not k.endswith("per_operation")}))

    problems = [f"{len(server_errors)} server error(s):", *server_errors[:20],
                f"{len(check_failures)} failed check(s):", *(f"{k}\n    {v}" for k, v in check_failures.items())]
    assert not server_errors and not check_failures, "\n".join(problems)
    assert cases >= MIN_CASES, f"only {cases} cases ran"


def test_malformed_corpus_on_postgres(fuzz_app: Any) -> None:
    """The malformed JSONL corpus (tests/fuzz/malformed/) on PostgreSQL, which refuses some text
    SQLite stores (NUL characters): the same per-line errors as tests/unit/test_malformed_jsonl.py."""
    from fastapi.testclient import TestClient

    from tests.fuzz.malformed_corpus import cases

    with TestClient(fuzz_app) as c:
        for case in cases():
            want = [(p.line, p.param) for p in case.problems]
            inline = c.post("/v1/batches", content=case.data(), headers={"Content-Type": "application/x-ndjson"})
            upload = c.post("/v1/files", files={"file": (f"{case.name}.jsonl", case.data())}, data={"purpose": "batch"})
            made = c.post("/v1/batches", json={"input_file_id": upload.json()["id"], "endpoint": case.endpoint})
            batch = c.get(f"/v1/batches/{made.json()['id']}").json()
            if not want:
                assert (inline.status_code, batch["status"]) == (202, "in_progress"), (case.name, inline.text)
                continue
            assert inline.status_code == 400, (case.name, inline.text)
            assert [(e["line"], e["param"]) for e in inline.json()["error"]["errors"]] == want, case.name
            assert batch["status"] == "failed", (case.name, batch)
            assert [(e["line"], e["param"]) for e in batch["errors"]["data"]] == want, case.name
