"""Image jobs end to end through the API, Redis, Postgres and S3: Stable Diffusion (tiny-sd,
the real diffusers code path) and the GAN kind (tiny-gan)."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
import pytest
from PIL import Image

from genq.workers.runners.png import read_png_parameters
from tests.support.processes import Stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def _submit(c: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    resp = c.post("/v1/jobs", json={"url": "/v1/images/generations", "body": body})
    assert resp.status_code == 202, resp.text
    return resp.json()


def _finished(c: httpx.Client, job_id: str, timeout: float = 90) -> dict[str, Any]:
    return wait_for(lambda: (j := c.get(f"/v1/jobs/{job_id}").json())["status"]
                    in ("succeeded", "failed", "cancelled") and j, timeout, 0.1, f"job {job_id}")


def _png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.format == "PNG"
    return img


def test_sd_images_download_from_presigned_urls(stack: Stack) -> None:
    body = {"model": "tiny-sd", "prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "n": 2,
            "size": "64x32", "num_inference_steps": 4, "guidance_scale": 6.0, "seed": 99, "scheduler": "ddim"}
    with stack.client() as c:
        job = _finished(c, _submit(c, body)["id"])
    assert job["status"] == "succeeded", job["error"]
    data = job["result"]["data"]
    assert [d["seed"] for d in data] == [99, 100]
    pixels = []
    for item in data:
        assert "output_key" not in item and item["url"].startswith("http://")
        assert "X-Amz-Expires=3600" in item["url"]
        raw = httpx.get(item["url"]).content
        img = _png(raw)
        assert img.size == (64, 32)
        params = read_png_parameters(raw)
        assert params["prompt"] == "a lighthouse at dusk" and params["negative_prompt"] == "blurry"
        assert params["seed"] == item["seed"] and params["num_inference_steps"] == 4
        assert params["scheduler"] == "ddim" and params["model"] == "tiny-sd" and params["guidance_scale"] == 6.0
        pixels.append(img.tobytes())
    assert pixels[0] != pixels[1]
    assert job["result"]["parameters"]["seed"] == 99


def test_same_request_same_pixels_and_b64_json(stack: Stack) -> None:
    body = {"model": "tiny-sd", "prompt": "a red cube", "size": "32x32", "num_inference_steps": 3, "seed": 5,
            "response_format": "b64_json"}
    with stack.client() as c:
        a, b = (_finished(c, _submit(c, body)["id"]) for _ in range(2))
        other = _finished(c, _submit(c, {**body, "seed": 6})["id"])
    imgs = [_png(base64.b64decode(j["result"]["data"][0]["b64_json"])).tobytes() for j in (a, b, other)]
    assert imgs[0] == imgs[1] and imgs[0] != imgs[2]


def test_progress_rises_while_running(stack: Stack) -> None:
    body = {"model": "tiny-sd", "prompt": "slow", "size": "64x64", "num_inference_steps": 150, "seed": 1}
    seen: list[float] = []
    with stack.client() as c:
        job = _submit(c, body)

        def poll() -> bool:
            j = c.get(f"/v1/jobs/{job['id']}").json()
            seen.append(j["progress"])
            return j["status"] == "succeeded"

        wait_for(poll, 120, 0.05, "image job finished")
    inside = sorted({p for p in seen if 0 < p < 1})
    assert len(inside) >= 3, seen
    assert seen == sorted(seen) and seen[-1] == 1.0


def test_cancel_mid_run_leaves_no_output(stack: Stack, settings_for: Any) -> None:
    from minio import Minio

    body = {"model": "tiny-sd", "prompt": "never finished", "size": "64x64", "num_inference_steps": 150}
    with stack.client() as c:
        job = _submit(c, body)
        wait_for(lambda: c.get(f"/v1/jobs/{job['id']}").json()["progress"] > 0.05, 60, 0.05, "job running")
        assert c.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        log = stack.logdir / "worker-tiny-sd.log"
        wait_for(lambda: f"job {job['id']} cancelled" in log.read_text(), 60, what="worker stopped the job")
        final = c.get(f"/v1/jobs/{job['id']}").json()
        # The worker stopped early: progress froze well below 1.
        assert final["status"] == "cancelled" and final["result"] is None and final["progress"] < 0.9
    s = settings_for()
    client = Minio(s.s3_endpoint, access_key=s.s3_access_key, secret_key=s.s3_secret_key, secure=False)
    assert list(client.list_objects("genq-test", prefix=f"out/jobs/{job['id']}/", recursive=True)) == []


def test_gan_job(stack: Stack) -> None:
    with stack.client() as c:
        job = _finished(c, _submit(c, {"model": "tiny-gan", "prompt": "dog", "n": 2, "size": "32x32", "seed": 3})["id"])
        bad = _finished(c, _submit(c, {"model": "tiny-gan", "prompt": "a giraffe", "size": "32x32"})["id"])
    assert job["status"] == "succeeded"
    imgs = [_png(httpx.get(d["url"]).content) for d in job["result"]["data"]]
    assert [i.size for i in imgs] == [(32, 32), (32, 32)]
    assert bad["status"] == "failed" and bad["error"]["param"] == "body.prompt"
    assert "cat" in bad["error"]["message"]


def test_bad_image_requests_are_4xx(stack: Stack) -> None:
    with stack.client() as c:
        for body, param in [
            ({"model": "tiny-sd", "prompt": "x", "size": "60x64"}, "body.size"),
            ({"model": "tiny-sd", "prompt": "x", "size": "512x512"}, "body.size"),  # over tiny-sd's max_size
            ({"model": "tiny-sd", "prompt": "x", "num_inference_steps": 500}, "body.num_inference_steps"),
            ({"model": "tiny-sd", "prompt": "x", "scheduler": "lms"}, "body.scheduler"),
            ({"model": "tiny-gpt2", "prompt": "x"}, "body.model"),
        ]:
            resp = c.post("/v1/jobs", json={"url": "/v1/images/generations", "body": body})
            assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


def test_mixed_batch_routes_each_line_to_its_model(stack: Stack) -> None:
    lines = [
        {"custom_id": "t1", "url": "/v1/completions", "body": {"model": "tiny-gpt2", "prompt": "Hi", "max_tokens": 4}},
        {"custom_id": "i1", "url": "/v1/images/generations",
         "body": {"model": "tiny-sd", "prompt": "sun", "size": "32x32", "num_inference_steps": 2}},
        {"custom_id": "g1", "url": "/v1/images/generations",
         "body": {"model": "tiny-gan", "prompt": "car", "size": "32x32"}},
        {"custom_id": "t2", "url": "/v1/completions", "body": {"model": "tiny-gpt2", "prompt": "Yo", "max_tokens": 4}},
    ]
    with stack.client() as c:
        batch = c.post("/v1/batches", content="".join(json.dumps(x) + "\n" for x in lines),
                       headers={"Content-Type": "application/x-ndjson"}).json()
        assert batch["endpoint"] == "mixed"
        wait_for(lambda: c.get(f"/v1/batches/{batch['id']}").json()["status"] == "completed", 120, 0.2)
        results = [json.loads(x) for x in c.get(f"/v1/batches/{batch['id']}/results").text.splitlines()]
    assert [r["custom_id"] for r in results] == ["t1", "i1", "g1", "t2"]
    assert results[0]["response"]["body"]["object"] == "text_completion"
    for r in results[1:3]:
        assert _png(httpx.get(r["response"]["body"]["data"][0]["url"]).content).size == (32, 32)
