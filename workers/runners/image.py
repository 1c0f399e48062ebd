"""Text-to-image with a diffusers Stable Diffusion pipeline: one OpenAI `/v1/images/generations`
request per run.

Image k of a request with seed s is drawn from its own CPU generator seeded with s + k, so it is
the same image as a request for one image with seed s + k (up to float rounding: a batch of n runs
other matrix kernels than a batch of one, which can move a few pixels by one level). The images
are stored as PNGs with their parameters in text chunks; the result names them by object key and
the API turns keys into URLs or base64 when it answers.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any, ClassVar

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from pydantic import BaseModel

from shared.registry import ModelSpec
from shared.schemas import ImageBody
from workers.runners.base import InvalidRequest, JobCancelled, RunContext, derive_seed
from workers.runners.device import resolve_device, resolve_dtype
from workers.runners.png import encode_png

# Request scheduler names -> diffusers classes, each built from the model's own scheduler config.
# LMSDiscreteScheduler is left out: it needs scipy, which genq does not install.
SCHEDULER_CLASSES: dict[str, Any] = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "dpm_solver_multistep": DPMSolverMultistepScheduler,
    "heun": HeunDiscreteScheduler,
    "unipc": UniPCMultistepScheduler,
}
MAX_RANDOM_SEED = 2**31 - 1  # a seed chosen for the user stays easy to type back in


class _StepWatch:
    """`callback_on_step_end`: report progress and interrupt the pipeline once the job is cancelled."""

    def __init__(self, ctx: RunContext, chunk: int, chunks: int) -> None:
        self.ctx, self.chunk, self.chunks = ctx, chunk, chunks
        self.cancelled = False

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        # num_timesteps, not num_inference_steps: second-order schedulers (Heun) take ~2 per step.
        done = (step + 1) / max(1, pipe.num_timesteps)
        self.ctx.set_progress(min(1.0, (self.chunk + done) / self.chunks))
        if self.ctx.is_cancelled():
            self.cancelled = True
            pipe._interrupt = True  # diffusers skips the remaining steps
        return callback_kwargs


class ImageRunner:
    kind: ClassVar[str] = "image"

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None:
        self.spec = spec
        self.device = resolve_device(device or spec.device)
        self.dtype = resolve_dtype(spec.dtype, self.device)
        self.max_size = int(spec.options.get("max_size", 1024))
        self.max_steps = int(spec.options.get("max_steps", 150))
        self.pipe: Any = None
        self._default_scheduler: Any = None
        self._schedulers: dict[str, Any] = {}
        # One pipeline, one scheduler slot: requests take turns.
        self._lock = threading.Lock()

    def load(self) -> None:
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if not self.spec.options.get("safety_checker", True):
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipe = StableDiffusionPipeline.from_pretrained(self.spec.source, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)  # attention runs through torch's SDPA by default
        self._default_scheduler = pipe.scheduler

    def run(self, body: BaseModel, ctx: RunContext) -> dict[str, Any]:
        assert isinstance(body, ImageBody)
        if self.pipe is None:
            self.load()
        # 1. Check the request against this model's limits.
        self.check_inputs(body)
        # 2. Seeds: the request's, or a fresh one reported back; image k uses seed + k.
        seed = body.seed if body.seed is not None else random.randint(0, MAX_RANDOM_SEED)
        seeds = [derive_seed(seed, k) for k in range(body.n)]
        scheduler_name = body.scheduler or type(self._default_scheduler).__name__
        # 3. Generate in batches of at most max_batch_size images, one generator per image.
        images: list[Any] = []
        nsfw: list[bool] = []
        per_call = max(1, self.spec.max_batch_size)
        chunks = [seeds[i:i + per_call] for i in range(0, len(seeds), per_call)]
        with self._lock:
            self.pipe.scheduler = self.scheduler(body.scheduler)
            for c, chunk in enumerate(chunks):
                watch = _StepWatch(ctx, c, len(chunks))
                out = self.pipe(
                    prompt=body.prompt, negative_prompt=body.negative_prompt,
                    height=body.height, width=body.width, num_images_per_prompt=len(chunk),
                    num_inference_steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
                    generator=[torch.Generator(device="cpu").manual_seed(s) for s in chunk],
                    callback_on_step_end=watch,
                )
                # 4. A cancelled job stores nothing.
                if watch.cancelled:
                    raise JobCancelled(ctx.job_id)
                images.extend(out.images)
                nsfw.extend(out.nsfw_content_detected or [False] * len(chunk))
        # 5. Store each image as a PNG carrying its own parameters.
        common = {
            "model": self.spec.name, "prompt": body.prompt, "negative_prompt": body.negative_prompt,
            "num_inference_steps": body.num_inference_steps, "guidance_scale": body.guidance_scale,
            "scheduler": scheduler_name, "size": body.size,
        }
        data: list[dict[str, Any]] = []
        for k, (image, seed_k, flagged) in enumerate(zip(images, seeds, nsfw, strict=False)):
            png = encode_png(image, {**common, "seed": seed_k, "index": k})
            key = ctx.put_output(f"{k}.png", png, "image/png")  # type: ignore[misc]
            item: dict[str, Any] = {"output_key": key, "seed": seed_k, "index": k, "revised_prompt": None}
            if flagged:  # the safety checker blacked this image out
                item["nsfw_content_detected"] = True
            data.append(item)
        # 6. Assemble the OpenAI images response; the API fills in url or b64_json.
        return {
            "created": int(time.time()),
            "data": data,
            "parameters": {**common, "seed": seed, "n": body.n},
        }

    def check_inputs(self, body: ImageBody) -> None:
        if body.adapter is not None:
            raise InvalidRequest(f"model {self.spec.name} does not serve adapters", "body.adapter")
        if body.scheduler is not None and body.scheduler not in SCHEDULER_CLASSES:
            raise InvalidRequest(f"scheduler {body.scheduler!r} is not available", "body.scheduler")
        if body.width % 8 or body.height % 8:
            raise InvalidRequest(f"size {body.size}: width and height must be multiples of 8", "body.size")
        if max(body.width, body.height) > self.max_size:
            raise InvalidRequest(
                f"size {body.size}: model {self.spec.name} allows at most {self.max_size} pixels a side",
                "body.size")
        if body.num_inference_steps > self.max_steps:
            raise InvalidRequest(
                f"num_inference_steps is {body.num_inference_steps}; model {self.spec.name} allows at "
                f"most {self.max_steps}", "body.num_inference_steps")

    def scheduler(self, name: str | None) -> Any:
        """The scheduler for a request name (None: the model's own), built once per name."""
        if name is None:
            return self._default_scheduler
        if name not in self._schedulers:
            self._schedulers[name] = SCHEDULER_CLASSES[name].from_config(self._default_scheduler.config)
        return self._schedulers[name]
