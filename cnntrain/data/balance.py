"""Class imbalance: per-class loss weights and a class-balanced sampling order.

    cnntrain train --dataset folder --data-dir photos --class-weights auto    # inverse frequency
    cnntrain train --dataset folder --data-dir photos --class-weights weights.yaml
    cnntrain train --dataset folder --data-dir photos --balanced-sampler

``--class-weights auto`` weighs class ``c`` by ``N / (C * n_c)`` (Keras / scikit-learn's
"balanced"): a class with half the average count counts twice in the loss, and the weights average
1 over the images. A FILE gives one positive weight per class: a YAML / JSON mapping of class name
to weight (classes left out weigh 1), or a list, or one number per line, in class order.

``--balanced-sampler`` draws each epoch's images with replacement, every class equally likely, as
many as the set holds. The draw is a pure function of (seed, epoch), like the shuffled order it
replaces, so every rank takes its own slice of the same draw and a resumed run draws the same.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import yaml

from cnntrain.data.pipeline import mix_seed
from cnntrain.errors import ConfigError, DataError

log = logging.getLogger("cnntrain")

_BALANCE_MIX = 0xBA1A  # keeps the balanced draw's generator apart from the shuffle's


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    """Images per class, ``num_classes`` long."""
    return torch.bincount(labels.long().cpu(), minlength=num_classes)[:num_classes].tolist()


def inverse_frequency(counts: list[int]) -> list[float]:
    """``N / (C * n_c)`` per class; a class without images gets 0 (it never appears in the loss)."""
    total, present = sum(counts), sum(1 for n in counts if n)
    return [total / (present * n) if n else 0.0 for n in counts]


def read_weights_file(path: str | Path, classes: list[str]) -> list[float]:
    """Per-class weights from ``path`` (see the module doc); ConfigError naming the file when it cannot be used."""
    path = Path(path)
    where = f"--class-weights {path}"
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror or exc}); give auto or a weights file") from None
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not YAML / JSON / one number per line ({str(exc).splitlines()[0]})") from None
    if isinstance(content, (int, float)) or (isinstance(content, str) and "\n" not in text.strip()):
        content = [content]
    elif isinstance(content, str):  # several lines of bare numbers parse as one string
        content = text.split()
    if isinstance(content, dict):
        unknown = [str(k) for k in content if str(k) not in classes]
        if unknown:
            raise ConfigError(f"{where}: unknown class(es) {', '.join(unknown[:5])}; the classes are "
                              f"{', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''}")
        values = [content.get(name, 1.0) for name in classes]
    elif isinstance(content, list):
        if len(content) != len(classes):
            raise ConfigError(f"{where}: {len(content)} weights for {len(classes)} classes; give one per class in "
                              f"class order, or a mapping of class name to weight")
        values = content
    else:
        raise ConfigError(f"{where}: expected a mapping of class name to weight, a list, or one number per line")
    out = []
    for name, value in zip(classes, values):
        try:
            weight = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: weight of class {name!r} is not a number: {value!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"{where}: weight of class {name!r} must be finite and >= 0, got {value!r}")
        out.append(weight)
    if not any(out):
        raise ConfigError(f"{where}: every weight is 0")
    return out


def class_weights(spec: str, labels: torch.Tensor, classes: list[str]) -> list[float] | None:
    """Loss weights for ``--class-weights spec`` ("": none, "auto": inverse frequency, else a file)."""
    if not spec:
        return None
    if spec == "auto":
        return inverse_frequency(class_counts(labels, len(classes)))
    return read_weights_file(spec, classes)


def loss_weights(spec: str, train, device: torch.device) -> torch.Tensor | None:
    """``--class-weights`` as a float32 tensor on ``device`` for the training set ``train`` (None: off)."""
    weights = class_weights(spec, train.labels, train.classes)
    if weights is None:
        return None
    log.info("class weights (%s): %s", spec, ", ".join(f"{name} {w:.3g}" for name, w in
                                                     list(zip(train.classes, weights))[:20]))
    return torch.tensor(weights, dtype=torch.float32, device=device)


def imbalance_note(labels: torch.Tensor, classes: list[str], ratio: float = 2.0, show: int = 12) -> str:
    """'' when the largest class has at most ``ratio`` times the smallest's images, else the counts."""
    counts = class_counts(labels, len(classes))
    if not counts or min(counts) * ratio >= max(counts):
        return ""
    pairs = sorted(zip(counts, classes), reverse=True)
    shown = pairs if len(pairs) <= show else [*pairs[:show // 2], *pairs[-(show // 2):]]
    text = ", ".join(f"{name} {n}" for n, name in shown)
    more = f" (of {len(pairs)} classes)" if len(pairs) > show else ""
    return f"class counts differ {max(counts) / max(min(counts), 1):.1f}x: {text}{more}"


class BalancedOrder:
    """Each epoch's sample order with every class equally likely (drawn with replacement).

    ``order(epoch)`` replaces the loaders' shuffled permutation: ``len(labels)`` indices drawn from
    a generator seeded by (seed, epoch), the same on every rank and on every resume."""

    def __init__(self, labels: torch.Tensor, num_classes: int, seed: int) -> None:
        counts = torch.tensor(class_counts(labels, num_classes), dtype=torch.float64)
        per_class = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
        self.weights = per_class[labels.long().cpu()]
        if not float(self.weights.sum()) > 0:
            raise DataError("--balanced-sampler: the training set has no labelled images")
        self.seed = seed

    def __call__(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, _BALANCE_MIX))
        return torch.multinomial(self.weights, len(self.weights), replacement=True, generator=g)
