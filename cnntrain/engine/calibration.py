"""Temperature scaling (Guo et al. 2017): one scalar T fitted on the validation split, logits / T.

    cnntrain eval --checkpoint runs/folder-resnet18-... --calibrate   # fits T, writes calibration.json
    cnntrain predict photo.jpg --checkpoint runs/folder-resnet18-...  # probabilities softmax(logits / T)

T minimises the validation negative log-likelihood; it changes no prediction, only how sure they
are. ``calibration.json`` sits in the run folder and names the weights file it was fitted for by
its SHA-256: weights that have changed since (a run trained on, a re-export) are not calibrated by
a stale T; ``read_temperature`` then says so and gives 1.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cnntrain.digest import file_digest
from cnntrain.engine.evaluate import tta_logits
from cnntrain.engine.precision import autocast

log = logging.getLogger("cnntrain")

CALIBRATION_FILE = "calibration.json"


@torch.no_grad()
def collect_logits(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, precision: str = "fp32",
                   tta_flip: bool = False, tta_translate: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits [N, C] and labels [N] of every image in ``batches``, on the CPU."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for images, target in batches:
            with autocast(precision, images.device.type):
                logits.append(tta_logits(model, images, tta_flip, tta_translate).float().cpu())
            labels.append(target.cpu())
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> float:
    """The T > 0 minimising the mean cross-entropy of ``logits / T`` (LBFGS on log T, from T = 1)."""
    logits, labels = logits.double(), labels.long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:  # the gradient by autograd.grad: training's step is the one backward pass
        loss = nn.functional.cross_entropy(logits / log_t.exp(), labels)
        (log_t.grad,) = torch.autograd.grad(loss, [log_t])
        return loss.detach()

    optimizer.step(closure)
    return float(log_t.detach().exp())


def run_folder_of(source: Path) -> Path:
    """The run folder holding weights ``source`` (``<run>/model.safetensors``, ``<run>/checkpoints/step-N.pt``)."""
    source = Path(source)
    return source.parent.parent if source.parent.name == "checkpoints" else source.parent


def save_temperature(source: Path, temperature: float, facts: dict[str, Any]) -> Path:
    """Write ``calibration.json`` into the run folder of weights ``source``; returns its path."""
    source = Path(source)
    path = run_folder_of(source) / CALIBRATION_FILE
    content = {"temperature": temperature, "weights": source.name, "sha256": file_digest(source, "sha256"), **facts}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_temperature(source: Path) -> float:
    """The temperature stored for weights ``source``, or 1.0 (none stored, or fitted for other weights)."""
    path = run_folder_of(Path(source)) / CALIBRATION_FILE
    if not path.is_file():
        return 1.0
    try:
        content = json.loads(path.read_text())
        temperature, digest = float(content["temperature"]), str(content["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s is unreadable (%s): probabilities are not calibrated", path, exc)
        return 1.0
    if digest != file_digest(source, "sha256"):
        log.warning("%s was fitted for other weights than %s (changed since): probabilities are not calibrated; "
                    "run cnntrain eval --calibrate again", path, source)
        return 1.0
    if not temperature > 0:
        return 1.0
    return temperature
