"""`genq up` on the embedded defaults (SQLite, file storage, SQLite broker: no server at all),
driven through the CLI a user would run: submit --wait, status, results -o, cancel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.processes import die_with_parent, free_port
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def test_genq_up_runs_a_batch_end_to_end(tmp_path: Path, tiny_registry: Path) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env.update(GENQ_MODELS_FILE=str(tiny_registry), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    # No GENQ_DATABASE_URL / BROKER / STORAGE: the embedded defaults under ./var of the cwd.
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen([sys.executable, "-m", "genq", "up", "--port", str(port), "--models", "tiny-gpt2,tiny-sd"],
                          cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                          preexec_fn=die_with_parent)

    def genq(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "genq", *args, "--api", api], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    try:
        wait_for(lambda: httpx.get(f"{api}/readyz", timeout=2).status_code == 200
                 and b"ready." in (tmp_path / "up.log").read_bytes(), 90, 0.3, "genq up ready")
        lines = [{"custom_id": f"e{i}", "url": "/v1/completions",
                  "body": {"model": "tiny-gpt2", "prompt": f"item {i}", "max_tokens": 5, "temperature": 0}}
                 for i in range(5)]
        lines.append({"custom_id": "e5", "url": "/v1/images/generations",
                      "body": {"model": "tiny-sd", "prompt": "a boat", "size": "32x32", "num_inference_steps": 2}})
        batch_file = tmp_path / "batch.jsonl"
        batch_file.write_text("".join(json.dumps(x) + "\n" for x in lines))

        done = genq("submit", str(batch_file), "--wait")
        assert done.returncode == 0, done.stderr
        batch_id = done.stdout.splitlines()[0]
        assert f"{batch_id} completed: 6 completed, 0 failed" in done.stdout

        status = json.loads(genq("status", batch_id).stdout)
        assert status["status"] == "completed" and status["request_counts"]["completed"] == 6

        out = genq("results", batch_id, "-o", str(tmp_path / "res"))
        assert out.returncode == 0, out.stderr
        results = [json.loads(x) for x in (tmp_path / "res" / f"{batch_id}.jsonl").read_text().splitlines()]
        assert [r["custom_id"] for r in results] == [f"e{i}" for i in range(6)]
        assert all(r["response"]["body"]["choices"][0]["text"] for r in results[:5])
        # On file storage the API serves image bytes itself, at a URL of its own.
        url = results[5]["response"]["body"]["data"][0]["url"]
        assert url.startswith(f"{api}/v1/jobs/")
        png = httpx.get(url)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content.startswith(b"\x89PNG")
        assert httpx.get(url.replace("0.png", "7.png")).status_code == 404

        # Everything lives under ./var: the SQLite results DB, the SQLite broker and the objects.
        assert (tmp_path / "var/genq.db").is_file() and (tmp_path / "var/broker.db").is_file()
        assert len(list((tmp_path / "var/objects/jobs").glob("*/1/0.png"))) == 1

        # The SQL broker carries no token streams: a streamed answer comes whole, in OpenAI's chunks.
        client = openai.OpenAI(base_url=f"{api}/v1", api_key="sk-local", max_retries=0, timeout=60)
        ask = {"model": "tiny-gpt2", "prompt": "The river", "max_tokens": 8, "seed": 2}
        chunks = list(client.completions.create(**ask, stream=True))
        whole = client.completions.create(**ask).choices[0].text
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")

        bad = genq("status", "nonsense")
        assert bad.returncode != 0 and "neither a batch id" in bad.stderr
        missing = genq("cancel", "job_doesnotexist")
        assert missing.returncode != 0 and "404" in missing.stderr
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        rc = up.wait(60)
    assert rc == 0, (tmp_path / "up.log").read_text()[-3000:]
