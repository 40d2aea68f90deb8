"""Decoding image files: every PIL mode as 8-bit RGB."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: greyscale, palette, CMYK, alpha (dropped), 16-bit grey (high byte)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit greyscale: convert("RGB") would clip at 255; keep the high byte instead.
        grey = (np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")  # L, P (palette), CMYK, RGBA, LA, YCbCr, ...
