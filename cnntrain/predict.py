"""``cnntrain predict``: top-k classes of image files with a trained model.

    cnntrain predict photo.jpg --checkpoint runs/folder-resnet18-20261123-101500 --top-k 5
    cnntrain predict photos/ --checkpoint model.safetensors --json

Images are prepared as the model was evaluated: photo-sized inputs (> 64 px) resized so the
shorter side is 256/224 of the input size and centre-cropped; small inputs (CIFAR, MNIST)
resized to the input size. Normalisation uses the mean/std stored with the weights. An image of
more than ``max_image_pixels`` pixels is refused from its header, undecoded (``data/images.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnntrain.api import load, load_weights, temperature_of
from cnntrain.data.crops import INTERPOLATIONS, resize_centre_crop
from cnntrain.data.folder import IMAGE_EXTENSIONS
from cnntrain.data.images import MAX_IMAGE_PIXELS, open_image, to_rgb
from cnntrain.engine.evaluate import tta_logits
from cnntrain.errors import DataError


@dataclass
class Prediction:
    path: Path
    top: list[tuple[str, float]] = field(default_factory=list)  # (class name, probability), best first
    error: str = ""  # why the file could not be scored ("" when it was)


def image_files(inputs: list[str | os.PathLike]) -> list[Path]:
    """Files given, plus the image files found (recursively, sorted) in folders given."""
    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            out.extend(sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        elif item.is_file():
            out.append(item)
        else:
            raise DataError(f"{item} is neither an image file nor a folder")
    return out


def prepare_image(path: Path, shape: tuple[int, int, int], max_pixels: int = MAX_IMAGE_PIXELS, eval_resize: int = 0,
                  interpolation: str = "bilinear") -> torch.Tensor:
    """uint8 [C, H, W] for a model taking ``shape`` = (C, H, W), resized as the run's evaluation did
    (``eval_resize``, ``interpolation``: see ``crops.resize_centre_crop``). Raises :class:`DataError`
    naming the file when it has more than ``max_pixels`` pixels (0: no limit)."""
    channels, height, width = shape
    interpolation = interpolation if interpolation in INTERPOLATIONS else "bilinear"  # the file's word, checked
    with open_image(path, str(path), max_pixels) as image:
        image.load()
        image = to_rgb(image)
    if height > 64 and height == width:
        image = resize_centre_crop(image, height, eval_resize, interpolation)
    elif image.size != (width, height):
        image = image.resize((width, height), INTERPOLATIONS[interpolation])
    if channels == 1:
        image = image.convert("L")
    array = np.asarray(image, dtype=np.uint8)
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


@torch.no_grad()
def predict(checkpoint: str | os.PathLike, inputs: list[str | os.PathLike], *, top_k: int = 5,
            device: str = "cpu", batch_size: int = 32, max_image_pixels: int = MAX_IMAGE_PIXELS,
            tta: bool = False, calibrated: bool = True) -> list[Prediction]:
    """Top-``top_k`` (class, probability) for every image in ``inputs`` (files or folders).

    ``tta``: logits averaged over each image and its mirror image. ``calibrated``: probabilities
    from logits divided by the temperature ``cnntrain eval --calibrate`` stored for these weights
    (none stored: T = 1).

    A file that cannot be decoded, or has more than ``max_image_pixels`` pixels (0: no limit), gets
    a :class:`Prediction` with ``error`` set instead of a crash.
    """

    _, _, meta = load_weights(checkpoint)
    model = load(checkpoint, device)
    temperature = temperature_of(checkpoint) if calibrated else 1.0
    shape = tuple(meta.get("input_shape") or (3, 224, 224))
    classes = meta.get("classes") or [str(i) for i in range(meta.get("num_classes") or 0)]
    mean = torch.tensor(meta.get("mean") or [0.5] * shape[0]).view(1, -1, 1, 1).to(device)
    std = torch.tensor(meta.get("std") or [0.25] * shape[0]).view(1, -1, 1, 1).to(device)
    files = image_files(inputs)
    results = [Prediction(p) for p in files]
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        batch = torch.stack([x for _, x in pending]).to(device).float().div_(255).sub_(mean).div_(std)
        probs = (tta_logits(model, batch, flip=tta) / temperature).softmax(dim=1)
        k = min(top_k, probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        for (i, _), vs, ix in zip(pending, values.tolist(), indices.tolist()):
            results[i].top = [(classes[j] if j < len(classes) else str(j), v) for v, j in zip(vs, ix)]
        pending.clear()

    for i, path in enumerate(files):
        try:
            pending.append((i, prepare_image(path, shape, max_image_pixels, meta.get("eval_resize") or 0,
                                                  meta.get("interpolation") or "bilinear")))
        except DataError as exc:
            results[i].error = str(exc)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            results[i].error = f"not a readable image ({type(exc).__name__}: {exc})"
        if len(pending) >= batch_size:
            flush()
    flush()
    return results
