"""Opening image files to decode them: the pixel limit on untrusted inputs, and conversion to RGB.

Every path that decodes images from files (in-memory folders, the streamed folder / TFRecord / tar
sets, ``--decode device``, ``cnntrain data prepare`` and ``cnntrain predict``) opens them with
:func:`open_image`. It reads the header only and refuses an image of more than ``max_image_pixels``
pixels (default 178,956,970, twice PIL's warning threshold; 0: no limit) before a pixel is decoded,
since a file of a few hundred bytes can claim an image of gigabytes. The refusal is a
:class:`ImageTooLarge` (a :class:`DataError`) naming the file, its size and the option.

PIL has a limit of its own, checked inside ``Image.open``: it refuses images of more than
``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels (the same 178,956,970 by default). So that a limit raised
above that really lets larger images through, :func:`open_image` then raises PIL's process-wide
``Image.MAX_IMAGE_PIXELS`` to match (None for 0: no limit); it never lowers it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import numpy as np
from PIL import Image

from cnntrain.errors import DataError

MAX_IMAGE_PIXELS = 178_956_970  # width x height; 2 x PIL's DecompressionBombWarning threshold
_HOW_TO_RAISE = "raise --max-image-pixels (max_image_pixels; 0: no limit) if the image is genuine"


class ImageTooLarge(DataError):
    """An image file claims more pixels than the limit allows; nothing of it was decoded."""


def check_pixels(size: tuple[int, int], where: str, limit: int = MAX_IMAGE_PIXELS) -> None:
    """Raise :class:`ImageTooLarge` naming ``where`` when a (width, height) image exceeds ``limit``
    pixels (0: no limit)."""
    width, height = size
    if limit and width * height > limit:
        raise ImageTooLarge(f"{where}: the image is {width}x{height} ({width * height:,} pixels), over the limit "
                            f"of {limit:,} pixels; {_HOW_TO_RAISE}")


def _lift_pil_limit(limit: int) -> None:
    """Let PIL open what ``limit`` allows: PIL refuses over 2 x ``Image.MAX_IMAGE_PIXELS`` itself."""
    current = Image.MAX_IMAGE_PIXELS
    if current is None:
        return
    if limit == 0:
        Image.MAX_IMAGE_PIXELS = None
    elif limit > 2 * current:
        Image.MAX_IMAGE_PIXELS = -(-limit // 2)


@contextmanager
def open_image(source: str | os.PathLike | IO[bytes], where: str,
               limit: int = MAX_IMAGE_PIXELS) -> Iterator[Image.Image]:
    """``Image.open(source)`` (the header only, nothing decoded yet) with the pixel limit checked;
    ``where`` names the file (or shard and record) in the error. Closes the image on exit."""
    _lift_pil_limit(limit)
    try:
        image = Image.open(source)
    except Image.DecompressionBombError as exc:  # over PIL's own limit: refused before our check could run
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(found.group(1)):,} pixels" if found else str(exc)
        raise ImageTooLarge(f"{where}: the image has {pixels}, over the limit of {limit:,} pixels; "
                            f"{_HOW_TO_RAISE}") from None
    with image:
        check_pixels(image.size, where, limit)
        yield image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: greyscale, palette, CMYK, alpha (dropped), 16-bit grey (high byte)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit greyscale: convert("RGB") would clip at 255; keep the high byte instead.
        grey = (np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")  # L, P (palette), CMYK, RGBA, LA, YCbCr, ...
