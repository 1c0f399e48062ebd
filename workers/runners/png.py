"""PNG encoding with the generation parameters in text chunks (readable by any PNG tool)."""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def encode_png(image: Image.Image, parameters: dict[str, Any]) -> bytes:
    """One tEXt chunk per parameter (`genq:<name>`) plus all of them as JSON in `genq:parameters`."""
    info = PngInfo()
    for key, value in parameters.items():
        if value is not None:
            info.add_text(f"genq:{key}", str(value))
    info.add_text("genq:parameters", json.dumps(parameters, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_png_parameters(data: bytes) -> dict[str, Any]:
    with Image.open(io.BytesIO(data)) as img:
        text = getattr(img, "text", {})
        return json.loads(text.get("genq:parameters", "{}"))  # type: ignore[no-any-return]
