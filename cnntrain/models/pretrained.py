"""Pretrained weights: torchvision's through its weights API into the torch hub cache (hash checked,
also for a file already cached), timm's through timm's own loader, and loading any state dict into a
model by name and shape, with a table of what was loaded, re-initialised and left unused.

    state, source = torchvision_state("resnet18", "DEFAULT")   # ~/.cache/torch/hub/checkpoints/...
    table = load_matching(model, state, source)                # the new head keeps its random init
    torchvision_preprocessing("resnet18", "DEFAULT").mean      # the weights' own normalisation

``CNNTRAIN_WEIGHTS_MIRROR`` (a base URL, e.g. ``http://mirror.local/models/``) fetches torchvision's
files from a mirror instead of download.pytorch.org: the file name, and so its hash, stay the same.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cnntrain.digest import file_digest
from cnntrain.errors import ConfigError, did_you_mean

log = logging.getLogger("cnntrain")

MIRROR_ENV = "CNNTRAIN_WEIGHTS_MIRROR"
TIMM_PREFIX = "timm/"
# torch.hub's convention: the file name carries the first hex digits of the file's sha256.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")
# densenet's published files name layers 'norm.1' (before '.' was banned in module names); torchvision's fix.
_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                           r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")


@dataclass(frozen=True)
class Preprocessing:
    """What the weights were trained on: [0, 1]-unit mean / std, the crop side and the resize side
    (pixels) of evaluation, and the interpolation."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_size: int
    resize_size: int
    interpolation: str

    def describe(self) -> str:
        mean = ",".join(f"{m:.3f}" for m in self.mean)
        std = ",".join(f"{s:.3f}" for s in self.std)
        return f"mean {mean} std {std}, resize {self.resize_size} crop {self.crop_size} {self.interpolation}"


@dataclass
class InitTable:
    """Which tensors of a model came from which file: loaded, re-initialised (with why), unused."""

    source: str
    loaded: list[str] = field(default_factory=list)
    reinitialised: dict[str, str] = field(default_factory=dict)  # name -> reason
    unused: dict[str, str] = field(default_factory=dict)  # name in the file -> reason

    def summary(self) -> str:
        head = ", ".join(sorted(self.reinitialised)[:6]) + (" ..." if len(self.reinitialised) > 6 else "")
        return (f"weights from {self.source}: {len(self.loaded)} tensors loaded, {len(self.reinitialised)} "
                f"re-initialised{f' ({head})' if head else ''}, {len(self.unused)} unused")

    def render(self) -> str:
        """The table as text: one line per tensor, status first."""
        lines = [self.summary(), "", f"{'status':<16} tensor (reason)"]
        lines += [f"{'loaded':<16} {name}" for name in self.loaded]
        lines += [f"{'re-initialised':<16} {name} ({why})" for name, why in self.reinitialised.items()]
        lines += [f"{'unused':<16} {name} ({why})" for name, why in self.unused.items()]
        return "\n".join(lines) + "\n"


def _strip_wrappers(name: str) -> str:
    """A DDP / torch.compile / AveragedModel key as the plain module's key."""
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def load_matching(model: nn.Module, state: dict[str, Any], source: str) -> InitTable:
    """Copy the tensors of ``state`` whose name and shape match ``model``'s into it; the others keep
    the model's own (random) initialisation, e.g. a classifier head for another class count.

    Raises ConfigError when nothing matches (another architecture, or not a state dict)."""
    tensors = {_strip_wrappers(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    tensors.pop("n_averaged", None)  # an AveragedModel's counter
    own = model.state_dict()
    table = InitTable(source)
    update = {}
    for name, mine in own.items():
        theirs = tensors.get(name)
        if theirs is None:
            table.reinitialised[name] = "not in the file"
        elif tuple(theirs.shape) != tuple(mine.shape):
            table.reinitialised[name] = f"shape {list(theirs.shape)} in the file, {list(mine.shape)} here"
        else:
            update[name] = theirs.to(dtype=mine.dtype)
            table.loaded.append(name)
    for name, theirs in tensors.items():
        if name not in own:
            table.unused[name] = "no such tensor here"
        elif name not in update:
            table.unused[name] = f"shape {list(theirs.shape)}"
    if not update:
        sample = ", ".join(list(tensors)[:3]) or "no tensors"
        raise ConfigError(f"{source}: no tensor matches model {type(model).__name__} by name and shape (the file "
                          f"has {sample}{', ...' if len(tensors) > 3 else ''}): is it another architecture?")
    with torch.no_grad():
        for name, value in update.items():
            own[name].copy_(value)
    return table


# ---------------------------------------------------------------------------------------------- torchvision
def torchvision_weights(name: str, tag: str):
    """The ``torchvision.models`` weights enum member ``tag`` (``DEFAULT``, ``IMAGENET1K_V1``, ...) of ``name``."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise ConfigError(f"--pretrained: torchvision publishes no weights for {name!r}") from None
    tags = [w.name for w in enum]
    if not tags:
        raise ConfigError(f"--pretrained: torchvision publishes no weights for {name!r}")
    if tag == "DEFAULT":
        return enum.DEFAULT
    if tag not in tags:
        raise ConfigError(f"--pretrained {tag!r}: {name} has weights {', '.join(['DEFAULT', *tags])}"
                          f"{did_you_mean(tag, tags)}")
    return enum[tag]


def hub_checkpoint_dir() -> Path:
    """Where torch hub keeps downloaded weights ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def check_cached_hash(path: Path) -> None:
    """Refuse a cached weights file whose sha256 does not start with the prefix in its name."""
    match = _HASH_IN_NAME.search(path.name)
    if not match or not match.group(1):
        return
    prefix, actual = match.group(1), file_digest(path, "sha256")
    if not actual.startswith(prefix):
        raise ConfigError(f"{path}: damaged or swapped weights file (its sha256 starts {actual[:len(prefix)]}, its "
                          f"name says {prefix}); delete it and run again to download it anew")


def mirrored(url: str) -> str:
    """``url`` on the mirror named by $CNNTRAIN_WEIGHTS_MIRROR (same file name), else unchanged."""
    base = os.environ.get(MIRROR_ENV, "").strip()
    return f"{base.rstrip('/')}/{url.rsplit('/', 1)[-1]}" if base else url


def torchvision_state(name: str, tag: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of torchvision's weights ``tag`` for ``name`` and the cached file it came from.

    Downloaded once into the torch hub cache with its hash checked; a cached file is checked too."""
    weights = torchvision_weights(name, tag)
    folder = hub_checkpoint_dir()
    file_name = weights.url.rsplit("/", 1)[-1]
    path, url = folder / file_name, mirrored(weights.url)
    if path.is_file():
        check_cached_hash(path)
    else:
        log.info("downloading %s to %s", url, path)
    try:
        state = torch.hub.load_state_dict_from_url(url, model_dir=str(folder), map_location="cpu", progress=False,
                                                   check_hash=True, file_name=file_name, weights_only=True)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(f"--pretrained {tag} for {name}: cannot download {url} ({reason}); offline, fetch that file "
                          f"elsewhere and put it, named {file_name}, in {folder} (or point ${MIRROR_ENV} at a "
                          f"mirror)") from None
    except RuntimeError as exc:
        if "hash" in str(exc):
            raise ConfigError(f"--pretrained {tag} for {name}: {url} did not match the sha256 prefix in "
                              f"{file_name} ({exc}); nothing was kept in {folder}") from None
        raise ConfigError(f"{path}: not a weights file torch can read ({str(exc).splitlines()[0][:200]})") from None
    if name.startswith("densenet"):
        state = {_densenet_key(k): v for k, v in state.items()}
    return state, str(path)


def _densenet_key(key: str) -> str:
    match = _DENSENET_KEY.match(key)
    return match.group(1) + match.group(2) if match else key


def _interpolation_name(mode: Any) -> str:
    return str(getattr(mode, "value", mode)).lower()


def torchvision_preprocessing(model: str, tag: str) -> Preprocessing:
    """The preprocessing published with torchvision's weights ``tag`` of ``model`` (nothing is downloaded)."""
    transforms = torchvision_weights(model, tag).transforms()
    return Preprocessing(tuple(transforms.mean), tuple(transforms.std), int(min(transforms.crop_size)),
                         int(min(transforms.resize_size)), _interpolation_name(transforms.interpolation))
