"""Where a runner puts its model and in which precision, from the registry's `device` and `dtype`."""

from __future__ import annotations

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(device: str) -> str:
    """`auto` is the (first visible) GPU when there is one; `genq worker --gpu N` decides which."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto` is float16 on CUDA and float32 on the CPU (where half precision is slow)."""
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} must be auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]
