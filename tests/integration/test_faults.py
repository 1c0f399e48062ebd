"""A worker SIGKILLed mid-job: the job is recovered through its lease and completes exactly once."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from tests.support.processes import Stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def test_job_of_killed_worker_completes_once_on_another_worker(stack: Stack, settings_for: Any) -> None:
    from minio import Minio

    with stack.client() as c:
        job = c.post("/v1/jobs", json={"url": "/v1/completions", "custom_id": "survivor",
                                       "body": {"model": "slow-echo", "prompt": "still here"}}).json()
        a = stack.start_worker("slow-echo", "--lease", "2", name="worker-victim")
        running = wait_for(lambda: (j := c.get(f"/v1/jobs/{job['id']}").json())["progress"] >= 0.2 and j,
                           60, 0.05, "job running on the first worker")
        assert running["status"] == "running" and running["attempts"] == 1

        os.killpg(a.pid, signal.SIGKILL)  # no chance to clean up or hand the job back
        a.wait(10)

        b = stack.start_worker("slow-echo", "--lease", "2", name="worker-rescuer")
        final = wait_for(lambda: (j := c.get(f"/v1/jobs/{job['id']}").json())["status"] in
                         ("succeeded", "failed") and j, 90, 0.2, "job recovered")
        assert final["status"] == "succeeded", final
        assert final["attempts"] == 2
        assert final["result"]["choices"][0]["text"] == "still here"

        # Exactly one output object: the killed attempt left none, the recovered one wrote one.
        s = settings_for()
        client = Minio(s.s3_endpoint, access_key=s.s3_access_key, secret_key=s.s3_secret_key, secure=False)
        keys = [o.object_name for o in client.list_objects("genq-test", prefix=f"out/jobs/{job['id']}/",
                                                           recursive=True)]
        assert keys == [f"out/jobs/{job['id']}/2/echo.json"]

        # It stays succeeded: a second delivery of the same message is skipped, not re-run.
        log = (stack.logdir / "worker-rescuer.log").read_text()
        assert log.count(f"job {job['id']} succeeded") == 1
        b.terminate()
