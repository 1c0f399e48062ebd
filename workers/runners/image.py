"""Text-to-image with a diffusers Stable Diffusion pipeline, serving OpenAI `/v1/images/generations`
requests in dynamic batches, optionally through a LoRA adapter.

Batching: requests with the same size, steps, guidance scale, scheduler and adapter share a batch
(`batch_key`); their prompts, negative prompts, seeds and n may differ. `run_batch` expands each
request into one row per image (its own prompt, negative prompt and seed) and runs the rows through
the pipeline in calls of at most `max_batch_size` images. A missing negative prompt is sent as ""
when a batch mate has one: diffusers encodes None as "" itself, and the images are bit-identical.

Reproducibility: image k of a request with seed s is drawn from its own CPU generator seeded with
s + k (its initial latents and, for ancestral schedulers, each step's noise), so its noise depends
on that seed alone, not on n, its batch mates or its row: it is the image of a request for one
image with seed s + k, up to float rounding, since a batch of 4 runs other matrix kernels in the
UNet and VAE than a batch of 1 (the text encoder's outputs were bit-identical). Measured on tiny-sd
(random weights, 64x64, fp32 on the CPU, 10 steps), each of 4 requests alone vs together (different
prompts, seeds and negative prompts; 3 orders): pndm, euler, euler_ancestral, heun,
dpm_solver_multistep and unipc differ by at most 1 level of 255 in at most 0.02% of the pixel
values; ddim by up to 11 levels in up to 42% of them, because DDIM on this model turns a 1e-6
relative change of the starting latents into ~1 level (the others: ~0.0002), magnifying any
rounding. Same device, same batch: same pixels. Not measured on a GPU (fp16 rounds coarser).

The images are stored as PNGs with their parameters in text chunks; the result names them by object
key and the API turns keys into URLs or base64 when it answers.
"""

from __future__ import annotations

import gc
import hashlib
import threading
import time
from collections import Counter, deque
from collections.abc import Hashable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
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

from genq.shared.options import ImageOptions
from genq.shared.registry import ModelSpec
from genq.shared.schemas import SCHEDULERS, ImageBody, ImageDatum
from genq.workers.runners.base import (
    BatchItem,
    Deferred,
    InvalidRequest,
    JobCancelled,
    LocalAdapter,
    Outcome,
    RunContext,
    derive_seed,
    finish,
    images_result,
    module_bytes,
    random_seed,
    typed_options,
)
from genq.workers.runners.device import resolve_device, resolve_dtype
from genq.workers.runners.lora import AdapterLRU
from genq.workers.runners.png import encode_png

# Request scheduler names -> diffusers classes, each built from the model's own scheduler config.
# LMSDiscreteScheduler is left out: it needs scipy, which genq does not install.
# The classes behind the request's scheduler names, in the order genq.shared.schemas.SCHEDULERS
# lists them (the names are written there only).
SCHEDULER_CLASSES: dict[str, Any] = dict(zip(SCHEDULERS, (
    DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
    DPMSolverMultistepScheduler, HeunDiscreteScheduler, UniPCMultistepScheduler), strict=True))
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes


@dataclass
class _Prepared:
    seed: int  # the request's seed (chosen here when it gave none)
    seeds: list[int]  # image k's seed


class _StepWatch:
    """`callback_on_step_end` for one pipeline call: report each item's progress, note which items
    are cancelled, and interrupt the call once all of them are."""

    def __init__(self, items: list[BatchItem], rows: list[tuple[int, int, int]]) -> None:
        # rows[m] = (item m's rows done before this call, its rows in this call, its rows in all)
        self.items, self.rows = items, rows
        self.cancelled = [False] * len(items)

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        # num_timesteps, not num_inference_steps: second-order schedulers (Heun) take ~2 per step.
        done = (step + 1) / max(1, pipe.num_timesteps)
        for m, item in enumerate(self.items):
            if self.cancelled[m]:
                continue
            before, here, total = self.rows[m]
            item.ctx.set_progress(min(1.0, (before + done * here) / total))
            self.cancelled[m] = item.ctx.is_cancelled()  # cheap: the worker caches it
        if all(self.cancelled):
            pipe._interrupt = True  # diffusers skips the remaining steps
        return callback_kwargs


class ImageRunner:
    kind: ClassVar[str] = "image"

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None:
        self.spec = spec
        self.device = resolve_device(device or spec.device)
        self.dtype = resolve_dtype(spec.dtype, self.device)
        self.options = typed_options(spec, ImageOptions)
        self.pipe: Any = None
        self._default_scheduler: Any = None
        self._schedulers: dict[str, Any] = {}
        # adapter id -> its name in the pipeline
        self.adapters: AdapterLRU[str] = AdapterLRU(self.options.max_adapters, self._unload_adapter)
        self._lora_state: str | None = "off"  # "on", "off", or None when unknown (after a load)
        # One pipeline, one scheduler slot, one set of active adapters: batches take turns.
        self._lock = threading.RLock()

    def load(self) -> None:
        with self._lock:
            kwargs: dict[str, Any] = {"dtype": self.dtype}
            if not self.options.safety_checker:
                kwargs.update(safety_checker=None, requires_safety_checker=False)
            if self.options.revision:
                kwargs["revision"] = self.options.revision
            pipe = StableDiffusionPipeline.from_pretrained(self.spec.source, **kwargs)
            pipe.set_progress_bar_config(disable=True)
            self.pipe = pipe.to(self.device)  # attention runs through torch's SDPA by default
            self._default_scheduler = pipe.scheduler
            self._schedulers.clear()
            self.adapters.clear()
            self._lora_state = "off"

    def unload(self) -> None:
        with self._lock:
            self.pipe = self._default_scheduler = None
            self._schedulers.clear()
            self.adapters.clear()  # they lived in the pipeline's modules
            self._lora_state = "off"
            gc.collect()
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()

    def memory_bytes(self) -> int:
        pipe = self.pipe
        if pipe is None:
            return 0
        return module_bytes(*(c for c in pipe.components.values() if isinstance(c, torch.nn.Module)))

    # --- the batch interface --------------------------------------------------------------------

    def prepare(self, item: BatchItem) -> None:
        body = item.body
        assert isinstance(body, ImageBody)
        self.check_inputs(body)
        if body.adapter is not None and item.adapter is None:
            raise InvalidRequest(f"adapter {body.adapter!r} is not available to model {self.spec.name}",
                                 "body.adapter")
        # The request's seed, or a fresh one reported back; image k uses seed + k.
        seed = body.seed if body.seed is not None else random_seed()
        item.prepared = _Prepared(seed, [derive_seed(seed, k) for k in range(body.n)])

    def batch_key(self, item: BatchItem) -> Hashable:
        body = item.body
        assert isinstance(body, ImageBody)
        adapter = item.adapter.id if item.adapter is not None else None
        return (body.height, body.width, body.num_inference_steps, body.guidance_scale, body.scheduler, adapter)

    def rows(self, item: BatchItem) -> int:
        assert isinstance(item.body, ImageBody)
        return item.body.n

    def run_batch(self, items: list[BatchItem]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(items)
        groups: dict[Hashable, list[int]] = {}  # items of another key (a direct caller's) run apart
        for i, item in enumerate(items):
            try:
                if item.prepared is None:
                    self.prepare(item)
                groups.setdefault(self.batch_key(item), []).append(i)
            except Exception as exc:  # noqa: BLE001 - the outcome of this item alone
                outcomes[i] = exc
        with self._lock:
            if self.pipe is None:
                self.load()
            for indices in groups.values():
                for i, outcome in zip(indices, self._run_group([items[i] for i in indices]), strict=True):
                    outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]  # every slot is filled

    def run(self, body: BaseModel, ctx: RunContext, adapter: LocalAdapter | None = None) -> dict[str, Any]:
        """One request on its own (tests, direct callers): its result, or its error raised."""
        item = BatchItem(body=body, ctx=ctx, adapter=adapter)
        self.prepare(item)
        outcome = finish(self.run_batch([item])[0])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _run_group(self, items: list[BatchItem]) -> list[Outcome]:
        """Items of one batch key: one row per image, generated in calls of max_batch_size rows."""
        first = items[0].body
        assert isinstance(first, ImageBody)
        # 1. The group's adapter (or none) and scheduler on the pipeline.
        try:
            self._use_adapter(items[0].adapter)
        except InvalidRequest as exc:
            return [InvalidRequest(str(exc), exc.param) for _ in items]
        self.pipe.scheduler = self.scheduler(first.scheduler)
        # 2. Rows (item, k, seed) in item order; skip those of items cancelled before their call.
        pending = deque((i, k, s) for i, item in enumerate(items) for k, s in enumerate(item.prepared.seeds))
        totals = [len(item.prepared.seeds) for item in items]
        done = [0] * len(items)
        cancelled = [False] * len(items)
        images: list[dict[int, tuple[Any, bool]]] = [{} for _ in items]
        per_call = self.options.max_batch_size
        while pending:
            cancelled = [c or item.ctx.is_cancelled() for c, item in zip(cancelled, items, strict=True)]
            chunk: list[tuple[int, int, int]] = []
            while pending and len(chunk) < per_call:
                row = pending.popleft()
                if not cancelled[row[0]]:
                    chunk.append(row)
            if not chunk:
                break
            # 3. One pipeline call: a prompt and a generator per image, so an image's noise is its own.
            counts = Counter(i for i, _, _ in chunk)
            members = list(counts)
            watch = _StepWatch([items[i] for i in members], [(done[i], counts[i], totals[i]) for i in members])
            negatives = [items[i].body.negative_prompt for i, _, _ in chunk]  # type: ignore[attr-defined]
            out = self.pipe(
                prompt=[items[i].body.prompt for i, _, _ in chunk],  # type: ignore[attr-defined]
                negative_prompt=None if all(n is None for n in negatives) else [n or "" for n in negatives],
                height=first.height, width=first.width, num_images_per_prompt=1,
                num_inference_steps=first.num_inference_steps, guidance_scale=first.guidance_scale,
                generator=[torch.Generator(device="cpu").manual_seed(s) for _, _, s in chunk],
                callback_on_step_end=watch,
            )
            flags = out.nsfw_content_detected or [False] * len(chunk)
            for (i, k, _), image, flagged in zip(chunk, out.images, flags, strict=True):
                images[i][k] = (image, bool(flagged))
            for m, i in enumerate(members):
                cancelled[i] = cancelled[i] or watch.cancelled[m]
                done[i] += counts[i]
        # 4. Cancelled items store nothing; the others store their PNGs and get their responses.
        outcomes: list[Outcome] = []
        for i, item in enumerate(items):
            if cancelled[i] or item.ctx.is_cancelled():
                outcomes.append(JobCancelled(item.ctx.job_id))
                continue
            # PNG encoding and storage run later in the job's own thread (base.Deferred).
            outcomes.append(Deferred(partial(self._respond, item, [images[i][k] for k in range(totals[i])])))
        return outcomes

    def _respond(self, item: BatchItem, images: list[tuple[Any, bool]]) -> dict[str, Any]:
        """Store each image as a PNG carrying its own parameters; build the OpenAI images response."""
        body, ctx, prepared = item.body, item.ctx, item.prepared
        assert isinstance(body, ImageBody) and ctx.put_output is not None
        common = {
            "model": self.spec.name, "prompt": body.prompt, "negative_prompt": body.negative_prompt,
            "num_inference_steps": body.num_inference_steps, "guidance_scale": body.guidance_scale,
            "scheduler": body.scheduler or type(self._default_scheduler).__name__, "size": body.size,
        }
        if item.adapter is not None:  # named only when used, so plain requests keep their shape
            common["adapter"] = body.adapter or item.adapter.id
        data: list[ImageDatum] = []
        keys: list[str] = []
        for k, ((image, flagged), seed_k) in enumerate(zip(images, prepared.seeds, strict=True)):
            png = encode_png(image, {**common, "seed": seed_k, "index": k})
            keys.append(ctx.put_output(f"{k}.png", png, "image/png"))
            # nsfw_content_detected: the safety checker blacked this image out
            data.append(ImageDatum(seed=seed_k, index=k, nsfw_content_detected=True if flagged else None))
        return images_result(data, {**common, "seed": prepared.seed, "n": body.n}, keys)

    # --- checks, schedulers, adapters -----------------------------------------------------------

    def check_inputs(self, body: ImageBody) -> None:
        if body.scheduler is not None and body.scheduler not in SCHEDULER_CLASSES:
            raise InvalidRequest(f"scheduler {body.scheduler!r} is not available", "body.scheduler")
        if body.width % 8 or body.height % 8:
            raise InvalidRequest(f"size {body.size}: width and height must be multiples of 8", "body.size")
        if max(body.width, body.height) > self.options.max_size:
            raise InvalidRequest(
                f"size {body.size}: model {self.spec.name} allows at most {self.options.max_size} pixels a side",
                "body.size")
        if body.num_inference_steps > self.options.max_steps:
            raise InvalidRequest(
                f"num_inference_steps is {body.num_inference_steps}; model {self.spec.name} allows at "
                f"most {self.options.max_steps}", "body.num_inference_steps")

    def scheduler(self, name: str | None) -> Any:
        """The scheduler for a request name (None: the model's own), built once per name."""
        if name is None:
            return self._default_scheduler
        if name not in self._schedulers:
            self._schedulers[name] = SCHEDULER_CLASSES[name].from_config(self._default_scheduler.config)
        return self._schedulers[name]

    def _use_adapter(self, adapter: LocalAdapter | None) -> None:
        """Make `adapter` the only active LoRA (loading it on first use), or switch LoRA off."""
        if adapter is None:
            if len(self.adapters) and self._lora_state != "off":
                self.pipe.disable_lora()  # the base weights alone: exactly the model without adapters
                self._lora_state = "off"
            return
        name = self.adapters.use(adapter.id) or self._load_adapter(adapter)
        self.pipe.set_adapters([name])
        if self._lora_state != "on":
            self.pipe.enable_lora()
            self._lora_state = "on"

    def _load_adapter(self, adapter: LocalAdapter) -> str:
        """Load a diffusers-format LoRA into the pipeline, then evict the least recently used adapter
        beyond max_adapters. A file that does not fit this model is the request's error."""
        name = "genq_" + hashlib.sha256(adapter.id.encode()).hexdigest()[:16]  # peft names must avoid "."
        started = time.perf_counter()
        self._lora_state = None  # new LoRA layers start enabled, the others keep their state
        try:
            self.pipe.load_lora_weights(str(adapter.path), weight_name=_weight_file(adapter), adapter_name=name)
            if not any(name in names for names in self.pipe.get_list_adapters().values()):
                raise ValueError("the file holds no LoRA weights for this model's UNet or text encoder")
        except Exception as exc:
            self.adapters.failed()
            self._drop(name)  # diffusers cleans up after a failed load; this catches what it misses
            if isinstance(exc, InvalidRequest):
                raise
            detail = f"{type(exc).__name__}: {exc}".replace(name, adapter.id)
            raise InvalidRequest(
                f"adapter {adapter.id!r} cannot be loaded into model {self.spec.name}: {detail[:300]}",
                "body.adapter") from exc
        self.adapters.loaded(adapter.id, name, time.perf_counter() - started)
        self.adapters.evict_beyond(self.adapters.capacity, keep=[adapter.id])
        return name

    def _unload_adapter(self, _adapter_id: str, name: str) -> None:
        self.pipe.delete_adapters([name])

    def _drop(self, name: str) -> None:
        try:
            self.pipe.delete_adapters([name])
        except Exception:  # noqa: BLE001 - nothing of it was left to delete
            pass


def _weight_file(adapter: LocalAdapter) -> str:
    """The LoRA weights file in the adapter's directory: diffusers' usual name, or its only one."""
    directory = Path(adapter.path)
    names = sorted(p.name for p in directory.glob("*.safetensors")) if directory.is_dir() else []
    if LORA_WEIGHT_NAME in names or len(names) == 1:
        return LORA_WEIGHT_NAME if LORA_WEIGHT_NAME in names else names[0]
    found = "none" if not names else ", ".join(names)
    raise InvalidRequest(
        f"adapter {adapter.id!r} needs one .safetensors LoRA file (ideally {LORA_WEIGHT_NAME}); found {found}",
        "body.adapter")
