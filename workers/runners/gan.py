"""Image sampling from a GAN generator (workers.gan.DCGANGenerator): one `/v1/images/generations`
request per run, each image one forward pass.

The request shape is the image one, read the GAN way:
- `size` must be the generator's native `{image_size}x{image_size}`; left out, it defaults to that.
- `prompt` is ignored by unconditional models. A class-conditional model reads it as a class label:
  it must equal one of the model's `class_labels`, ignoring case and surrounding spaces.
- `num_inference_steps`, `guidance_scale`, `scheduler` and `negative_prompt` mean nothing to a
  single-pass generator: they are ignored and reported as None.
- Image k uses latent z ~ N(0, I) drawn on the CPU from seed `derive_seed(seed, k)`, and is
  generated alone (batch of one), so n=1 with that seed gives bit-identical pixels on the same
  device; a request without a seed gets a random one, reported back.

The worker's batcher serves it as a SerialRunner: each request is its own batch (a forward pass
per image is already cheap), and adapters are refused.
"""

from __future__ import annotations

import gc
from typing import Any, ClassVar

import torch
from PIL import Image
from pydantic import BaseModel

from genq.shared.registry import ModelSpec
from genq.shared.schemas import ImageBody, ImageDatum
from genq.workers.gan import DCGANGenerator, GANConfig, load_generator, to_pil
from genq.workers.runners.base import (
    InvalidRequest,
    JobCancelled,
    RunContext,
    SerialRunner,
    derive_seed,
    images_result,
    module_bytes,
    random_seed,
)
from genq.workers.runners.device import resolve_device, resolve_dtype
from genq.workers.runners.png import encode_png


class GANRunner(SerialRunner):
    kind: ClassVar[str] = "gan"

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None:
        self.spec = spec
        self.device = resolve_device(device or spec.device)
        self.dtype = resolve_dtype(spec.dtype, self.device)
        self.model: DCGANGenerator | None = None
        self.config: GANConfig | None = None

    def load(self) -> None:
        self.model, self.config = load_generator(self.spec.source, self.device, self.dtype)

    def unload(self) -> None:
        self.model = self.config = None
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def memory_bytes(self) -> int:
        return module_bytes(self.model)

    def run(self, body: BaseModel, ctx: RunContext) -> dict[str, Any]:
        assert isinstance(body, ImageBody)
        if self.model is None:
            self.load()
        assert self.model is not None and self.config is not None
        # 1. Check the request against what this generator can make.
        class_index = self.check_inputs(body)
        seed = body.seed if body.seed is not None else random_seed()
        parameters = self.request_parameters(body, seed, class_index)
        if ctx.is_cancelled():
            raise JobCancelled(ctx.job_id)
        # 2. One latent per image from its own seed, one forward pass each.
        seeds = [derive_seed(seed, k) for k in range(body.n)]
        images: list[Image.Image] = []
        for k, seed_k in enumerate(seeds):
            if k and ctx.is_cancelled():
                raise JobCancelled(ctx.job_id)
            images.append(self.generate(seed_k, class_index))
            ctx.set_progress((k + 1) / body.n)
        # 3. Store each image as a PNG carrying its own parameters.
        assert ctx.put_output is not None
        data, keys = [], []
        for k, (image, seed_k) in enumerate(zip(images, seeds, strict=False)):
            params_k = {key: parameters[key] for key in ("model", "prompt", "size", "kind", "class_label")
                        if key in parameters}
            png = encode_png(image, {**params_k, "seed": seed_k, "index": k})
            keys.append(ctx.put_output(f"{k}.png", png, "image/png"))
            data.append(ImageDatum(seed=seed_k, index=k))
        ctx.set_progress(1.0)
        return images_result(data, parameters, keys)

    def check_inputs(self, body: ImageBody) -> int | None:
        """Validate size, prompt and adapter; return the class index (None when unconditional)."""
        assert self.config is not None
        config = self.config
        if body.adapter is not None:
            raise InvalidRequest(f"model {self.spec.name} does not serve adapters", "body.adapter")
        # An omitted size means the native one: the ImageBody default is a diffusion size.
        if "size" in body.model_fields_set and body.size != config.size:
            raise InvalidRequest(
                f"size is {body.size}; model {self.spec.name} is a GAN that only makes {config.size} "
                f"images: use size {config.size}", "body.size")
        if not config.conditional:
            return None
        index = config.label_index(body.prompt)
        if index is None:
            allowed = ", ".join(repr(x) for x in config.class_labels)
            raise InvalidRequest(
                f"model {self.spec.name} generates one of the classes {allowed}; the prompt must be "
                f"one of them (case-insensitive), got {body.prompt.strip()[:100]!r}", "body.prompt")
        return index

    def request_parameters(self, body: ImageBody, seed: int, class_index: int | None) -> dict[str, Any]:
        assert self.config is not None
        parameters: dict[str, Any] = {
            "model": self.spec.name, "kind": self.kind, "prompt": body.prompt, "n": body.n,
            "size": self.config.size, "seed": seed,
            # Single pass, no sampler, no text guidance: these request fields do nothing here.
            "num_inference_steps": None, "guidance_scale": None, "scheduler": None, "negative_prompt": None,
        }
        if class_index is not None:
            parameters["class_label"] = self.config.class_labels[class_index]
        return parameters

    def generate(self, seed: int, class_index: int | None) -> Image.Image:
        """One image: z drawn on the CPU (the same on every device) from `seed`, then moved over."""
        assert self.model is not None and self.config is not None
        generator = torch.Generator(device="cpu").manual_seed(seed)
        z = torch.randn(1, self.config.z_dim, generator=generator).to(self.device, self.dtype)
        labels = None
        if class_index is not None:
            labels = torch.tensor([class_index], device=self.device)
        with torch.inference_mode():
            return to_pil(self.model(z, labels))[0]
