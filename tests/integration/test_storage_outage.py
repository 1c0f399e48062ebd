"""Object storage unreachable, or its bucket gone, under a running API and worker.

The module's own moto server sits behind a TCP proxy that the tests cut (connections refused,
moto keeps its data) and restore; restarting moto loses the bucket. The genq processes use their
own database and Redis, so no other test's worker takes these jobs. What is checked is what a
tenant sees: jobs end `succeeded` once storage is back (none failed on the first error), errors
name no host, port, bucket or key, /readyz and file reads answer 503 while storage is down, and
a batch whose finalization met the outage is finalized afterwards."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.support.processes import Stack
from tests.support.servers import PrivateMoto, PrivateRedis, throwaway_database
from tests.support.tcpproxy import TcpProxy
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

BUCKET = "genq-test"
HANDED_BACK = b"handed back to the queue (storage unavailable)"
OUTAGE_JOBS = 400
OUTAGE_S = 30.0


@dataclass
class Outage:
    stack: Stack
    moto: PrivateMoto
    proxy: TcpProxy

    def secrets(self) -> list[str]:
        """What no tenant-visible text may contain: the addresses, the bucket, key prefixes."""
        return [str(self.proxy.port), str(self.moto.port), "127.0.0.1", BUCKET, "out/", "jobs/", "files/"]

    def assert_nothing_leaks(self, text: str) -> None:
        leaked = [s for s in self.secrets() if s in text]
        assert not leaked, f"{leaked} in {text}"

    def handbacks(self) -> int:
        return (self.stack.logdir / "worker.log").read_bytes().count(HANDED_BACK)

    def logged(self, text: str) -> bool:
        """Whether the API or the worker logged `text`."""
        return any(text.encode() in (self.stack.logdir / f"{p}.log").read_bytes() for p in ("api", "worker"))


@pytest.fixture(scope="module")
def outage(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outage]:
    logdir = tmp_path_factory.mktemp("storage-outage")
    moto = PrivateMoto(logdir)
    moto.start()
    proxy = TcpProxy(moto.endpoint)
    proxy.restore()
    redis = PrivateRedis()
    redis.start()
    with throwaway_database(f"genq_storage_{uuid.uuid4().hex[:8]}") as db:
        env = {**stack_env, "GENQ_DATABASE_URL": db, "GENQ_BROKER_URL": redis.url,
               "GENQ_S3_ENDPOINT": proxy.address, "GENQ_STORAGE_URL": f"s3://{BUCKET}/out"}
        stack = Stack(env, logdir)
        try:
            stack.start_api()
            worker = stack.start_worker("fault-echo,echo", name="worker")
            stack.wait_worker_ready(worker, "worker")
            yield Outage(stack, moto, proxy)
        except BaseException:
            print(stack.logs())
            raise
        finally:
            stack.stop()
            proxy.cut()
            moto.stop()
            redis.kill()


@pytest.fixture()
def up(outage: Outage) -> Iterator[Outage]:
    """The outage fixture with storage reachable at the start and again at the end of the test."""
    yield outage
    if outage.proxy.is_cut:
        outage.proxy.restore()


def submit_jobs(c: httpx.Client, n: int, model: str = "fault-echo") -> list[str]:
    ids = []
    for i in range(n):
        resp = c.post("/v1/jobs", json={"url": "/v1/completions", "body": {"model": model, "prompt": f"p{i}"}})
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["id"])
    return ids


def jobs_of(c: httpx.Client, ids: list[str]) -> list[dict[str, Any]]:
    return [c.get(f"/v1/jobs/{job_id}").json() for job_id in ids]


def all_ended(c: httpx.Client, ids: list[str]) -> list[dict[str, Any]] | None:
    jobs = jobs_of(c, ids)
    return jobs if all(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs) else None


def test_jobs_submitted_during_a_storage_outage_all_succeed_once_it_is_back(up: Outage) -> None:
    with up.stack.client() as c:
        before = up.handbacks()
        up.proxy.cut()
        ids = submit_jobs(c, 12)
        # Each worker thread retries its write for a while, then hands its job back to the queue.
        wait_for(lambda: up.handbacks() > before, 60, 0.2, "a job handed back while storage is down")

        ready = c.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "error: unavailable"}
        up.assert_nothing_leaks(ready.text)
        during = jobs_of(c, ids)
        assert all(j["status"] in ("queued", "running") for j in during), [j["status"] for j in during]

        up.proxy.restore()
        jobs = wait_for(lambda: all_ended(c, ids), 90, 0.25, "every job to end")
        assert [j["status"] for j in jobs] == ["succeeded"] * len(ids), [j.get("error") for j in jobs]
        # The outage used up none of the jobs' attempts, and left nothing in what a tenant reads.
        assert all(j["attempts"] == 1 and j["error"] is None for j in jobs), jobs
        up.assert_nothing_leaks(json.dumps(jobs))
        assert wait_for(lambda: c.get("/readyz").status_code == 200, 10, 0.2, "ready again")


def test_a_30s_outage_in_the_middle_of_400_jobs_fails_none(up: Outage) -> None:
    """The issue's reproduction: 400 jobs, storage unreachable for 30 s after the first 50."""
    with up.stack.client() as c:
        requests = [{"custom_id": f"r{i}", "url": "/v1/completions",
                     "body": {"model": "fault-echo", "prompt": f"p{i}"}} for i in range(OUTAGE_JOBS)]
        resp = c.post("/v1/batches", json={"requests": requests})
        assert resp.status_code == 202, resp.text
        batch_id = resp.json()["id"]

        def counts() -> dict[str, int]:
            return c.get(f"/v1/batches/{batch_id}").json()["request_counts"]  # type: ignore[no-any-return]

        wait_for(lambda: counts()["completed"] >= 50, 60, 0.1, "50 jobs done")
        before = up.handbacks()
        up.proxy.cut()
        time.sleep(OUTAGE_S)  # the fault's length, not a wait for something
        failed_during, done_during = counts()["failed"], counts()["completed"]
        up.proxy.restore()
        restored = time.monotonic()
        batch = wait_for(lambda: (b := c.get(f"/v1/batches/{batch_id}").json())["status"] == "completed" and b,
                         180, 0.25, "the batch to complete")
        drained_s = time.monotonic() - restored
        output = c.get(f"/v1/files/{batch['output_file_id']}/content").text.splitlines()

    figures = {"jobs": OUTAGE_JOBS, "outage_s": OUTAGE_S, "failed_during_outage": failed_during,
               "completed_during_outage": done_during, "handed_back": up.handbacks() - before,
               "failed": batch["request_counts"]["failed"], "completed": batch["request_counts"]["completed"],
               "batch_done_after_restore_s": round(drained_s, 1), "output_lines": len(output)}
    print("storage outage figures:", json.dumps(figures))
    assert figures["failed"] == 0 and figures["completed"] == OUTAGE_JOBS == len(output), figures
    assert figures["handed_back"] > 0, figures


def test_file_content_answers_503_with_retry_after_while_storage_is_down(up: Outage) -> None:
    with up.stack.client() as c:
        line = b'{"custom_id":"a","url":"/v1/completions","body":{"model":"echo","prompt":"x"}}\n'
        file = c.post("/v1/files", files={"file": ("in.jsonl", line)}, data={"purpose": "batch"}).json()
        up.proxy.cut()
        started = time.monotonic()
        down = c.get(f"/v1/files/{file['id']}/content")
        took = time.monotonic() - started
        upload = c.post("/v1/files", files={"file": ("in.jsonl", line)}, data={"purpose": "batch"})
        delete = c.delete(f"/v1/files/{file['id']}")
        up.proxy.restore()
        back = c.get(f"/v1/files/{file['id']}/content")  # the refused delete left the file whole
        assert c.delete(f"/v1/files/{file['id']}").status_code == 200

    for resp in (down, upload, delete):
        assert resp.status_code == 503, resp.text
        assert resp.headers["Retry-After"].isdigit()
        error = resp.json()["error"]
        assert (error["code"], error["type"]) == ("storage_unavailable", "service_unavailable")
        up.assert_nothing_leaks(resp.text)
    assert took < 5, f"an unreachable storage took {took:.1f}s to answer"
    assert back.status_code == 200 and back.content == line


def test_a_batch_whose_finalization_met_the_outage_is_finalized_once_storage_is_back(up: Outage) -> None:
    with up.stack.client() as c:
        up.proxy.cut()
        # echo jobs store nothing, so they end while storage is down; their batch cannot be written.
        requests = [{"custom_id": f"r{i}", "url": "/v1/completions", "body": {"model": "echo", "prompt": f"p{i}"}}
                    for i in range(5)]
        resp = c.post("/v1/batches", json={"requests": requests})
        assert resp.status_code == 202, resp.text
        batch_id = resp.json()["id"]
        wait_for(lambda: c.get(f"/v1/batches/{batch_id}").json()["request_counts"]["completed"] == 5, 60, 0.2,
                 "the batch's jobs done")
        wait_for(lambda: up.logged(f"batch {batch_id} not finalized yet"), 30, 0.2, "a finalization to meet the outage")
        assert c.get(f"/v1/batches/{batch_id}").json()["status"] != "completed"

        up.proxy.restore()
        batch = wait_for(lambda: (b := c.get(f"/v1/batches/{batch_id}").json())["status"] == "completed" and b,
                         30, 0.25, "the batch finalized after storage came back")
        output = c.get(f"/v1/files/{batch['output_file_id']}/content")
        assert output.status_code == 200
        assert sorted(json.loads(x)["custom_id"] for x in output.text.splitlines()) == [f"r{i}" for i in range(5)]


def test_jobs_succeed_after_the_bucket_is_lost(up: Outage) -> None:
    """A storage server restarted empty: the bucket is made again and jobs go on succeeding."""
    with up.stack.client() as c:
        first = submit_jobs(c, 1)
        assert wait_for(lambda: all_ended(c, first), 30, 0.25, "a first job")[0]["status"] == "succeeded"
        up.moto.stop()
        up.moto.start()  # same port, no buckets
        ids = submit_jobs(c, 5)
        jobs = wait_for(lambda: all_ended(c, ids), 60, 0.25, "every job to end")
        assert [j["status"] for j in jobs] == ["succeeded"] * 5, [j.get("error") for j in jobs]
        up.assert_nothing_leaks(json.dumps(jobs))
        assert c.get("/readyz").status_code == 200
