"""The Python API: every CLI command is also a function here.

    import cnntrain
    result = cnntrain.train(dataset="mnist", model="lenet", epochs=2)
    model = cnntrain.load(result.run_dir)          # ready for inference
    scores = cnntrain.evaluate(result.run_dir)     # top-1 / top-5 / loss / per-class
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cnntrain.config import TrainConfig, build_config, config_from_dict
from cnntrain.data.datasets import load_data, with_resize
from cnntrain.data.loaders import build_eval_loader
from cnntrain.engine import checkpoint as ckpt
from cnntrain.engine.calibration import (
    collect_logits,
    fit_temperature,
    read_temperature,
    run_folder_of,
    save_temperature,
)
from cnntrain.engine.callbacks import Callback
from cnntrain.engine.evaluate import EvalResult
from cnntrain.engine.evaluate import evaluate as score
from cnntrain.engine.progress import setup_logging
from cnntrain.engine.run import Result, read_safetensors
from cnntrain.engine.trainer import train as train_with
from cnntrain.errors import CheckpointError, ConfigError
from cnntrain.hardware import with_resolved_precision
from cnntrain.models import get_spec
from cnntrain.models.registry import create_model_for
from cnntrain.parallel.env import detect_launch
from cnntrain.parallel.ps.roles import run_async_ps
from cnntrain.parallel.strategy import make_strategy, resume_for_restart

log = logging.getLogger("cnntrain")

def train(config: TrainConfig | dict | None = None, *, callbacks: Iterable[Callback] = (), **kwargs: Any) -> Result:
    """Train with a ``TrainConfig``, a dict of options, or keyword options (``recipe=`` a recipe name).

    ``callbacks``: ``cnntrain.Callback`` objects called at the loop's moments (see engine/callbacks.py).
    Under torchrun / mpirun / srun every process calls this; the launcher's variables say who is who."""
    if isinstance(config, TrainConfig):
        cfg = config.replace(**kwargs) if kwargs else config
    else:
        options = {**(config or {}), **kwargs}
        cfg = build_config(options.pop("recipe", None) or options.pop("config", None), **options)
    if cfg.strategy == "async-ps":  # its roles run their own processes
        if callbacks:
            raise ConfigError("callbacks hang on the synchronous loop; --strategy async-ps takes none")
        return run_async_ps(cfg)
    setup_logging()
    launch = detect_launch()
    if launch.rank != 0:
        log.setLevel(logging.WARNING)  # one line of output per event, from rank 0
    cfg = resume_for_restart(cfg, main=launch.rank == 0)
    # --precision auto is resolved once the strategy is set up, to rank 0's choice on every rank.
    return train_with(cfg, make_strategy(cfg, launch), callbacks)


def _weights_source(path: Path) -> Path:
    """A run folder -> its model.safetensors, else its newest valid checkpoint; a file -> itself."""
    path = Path(path)
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return path / "model.safetensors"
        found = ckpt.latest_valid(path / "checkpoints")
        if found is None:
            raise CheckpointError(f"{path} holds neither model.safetensors nor a valid checkpoint")
        return found
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    return path


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], TrainConfig, dict]:
    """State dict, config and metadata (classes, mean, std, input shape) of a run, checkpoint or
    ``model.safetensors``."""
    source = _weights_source(Path(path))
    if source.suffix == ".safetensors":
        state, meta = read_safetensors(source)
        if "config" not in meta:
            raise CheckpointError(f"{source} was not written by cnntrain (no config in its metadata)")
        return state, config_from_dict(meta["config"]), meta
    payload = ckpt.load_checkpoint(source)
    try:
        cfg = config_from_dict(payload["config"])
        state = payload["ema"] if "ema" in payload else payload["model"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{source} is not a cnntrain checkpoint") from None
    if "ema" in payload:  # AveragedModel keys: module.<name> plus n_averaged
        state = {k.removeprefix("module."): v for k, v in state.items() if k != "n_averaged"}
    return state, cfg, dict(payload.get("meta", {}))


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A trained model in eval mode, from a run folder, a checkpoint or ``model.safetensors``.

    The returned module carries ``.classes``, ``.mean`` and ``.std`` when the run recorded them."""
    state, cfg, meta = load_weights(path)
    num_classes = meta.get("num_classes") or _infer_classes(state)
    shape = meta.get("input_shape")
    model = create_model_for(cfg.model, num_classes, tuple(shape) if shape else None, **cfg.model_kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {path} do not fit model {cfg.model!r}: {str(exc).splitlines()[0]}") \
            from None
    model.classes = meta.get("classes")
    model.mean, model.std = meta.get("mean"), meta.get("std")
    return model.to(device).eval()


def _infer_classes(state: dict[str, torch.Tensor]) -> int:
    last = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    if not last:
        raise CheckpointError("cannot tell the number of classes from the weights")
    return last[-1].shape[0]


def evaluate(path: str | Path, *, calibrated: bool = False, **overrides: Any) -> EvalResult:
    """Score a run, checkpoint or ``model.safetensors`` on its data set's validation/test split.

    ``overrides`` change the stored config (e.g. ``data_dir=``, ``batch_size=``, ``device=``);
    ``calibrated``: logits divided by the run's fitted temperature (``calibrate``), when it has one
    for these weights (loss and calibration error change, predictions do not)."""
    temperature = temperature_of(path) if calibrated else 1.0
    with _eval_setup(path, overrides) as (cfg, strategy, data, model, loader):
        return score(model, loader.iterate(0), data.num_classes, precision=cfg.precision,
                     device=strategy.device, confusion=True, tta_flip=cfg.tta_flip, tta_translate=cfg.tta_translate,
                     all_reduce=strategy.all_reduce_sum if strategy.world_size > 1 else None,
                     temperature=temperature)


def temperature_of(path: str | Path) -> float:
    """The calibration temperature stored for the weights at ``path`` (1.0: not calibrated)."""
    return read_temperature(_weights_source(Path(path)))


def eval_folder(path: str | Path) -> Path:
    """Where ``cnntrain eval`` writes its report for the weights at ``path``: ``<run folder>/eval``."""
    return run_folder_of(_weights_source(Path(path))) / "eval"


def calibrate(path: str | Path, **overrides: Any) -> dict[str, Any]:
    """Fit the temperature of a run's weights on its validation split and store it in the run folder
    (``calibration.json``, read by ``predict`` and ``evaluate(calibrated=True)``). Returns the facts
    stored: temperature, validation NLL before / after, images, split. One process only."""
    source = _weights_source(Path(path))
    with _eval_setup(path, overrides) as (cfg, strategy, data, model, loader):
        if strategy.world_size > 1:
            raise ConfigError("cnntrain eval --calibrate runs in one process: start it without a launcher")
        logits, labels = collect_logits(model, loader.iterate(0), precision=cfg.precision, tta_flip=cfg.tta_flip,
                                        tta_translate=cfg.tta_translate)
    temperature = fit_temperature(logits, labels)
    nll = [float(torch.nn.functional.cross_entropy(logits.double() / t, labels)) for t in (1.0, temperature)]
    facts = {"nll_before": nll[0], "nll_after": nll[1], "images": len(labels), "split": data.val_name}
    written = save_temperature(source, temperature, facts)
    return {"temperature": temperature, **facts, "file": str(written)}


@contextlib.contextmanager
def _eval_setup(path: str | Path, overrides: dict[str, Any]):
    """(cfg, strategy, data, model, validation loader) for scoring the weights at ``path``."""
    state, saved, meta = load_weights(path)
    cfg = build_config(**{**saved.to_dict(), "resume": "", **{k: v for k, v in overrides.items() if v is not None}})
    strategy = make_strategy(cfg)
    cfg = with_resolved_precision(cfg, strategy.device, announce=False)  # a stored config is resolved already
    strategy.setup()
    try:
        shape = meta.get("input_shape")  # as trained: a pretrained run crops at its weights' size
        data = load_data(cfg, input_size=tuple(shape) if shape else get_spec(cfg.model).input_size)
        data = with_resize(data, meta.get("eval_resize") or 0, meta.get("interpolation") or "bilinear")
        if data.val is None:
            raise CheckpointError(f"data set {cfg.dataset} in {cfg.data_dir} has no validation or test split")
        model = load(path, strategy.device)
        mean = meta.get("mean") or data.mean
        std = meta.get("std") or data.std
        loader = build_eval_loader(cfg, data.val, strategy.device, mean, std, strategy.rank, strategy.world_size,
                                   local_world_size=strategy.local_world_size)
        yield cfg, strategy, data, model, loader
    finally:
        strategy.teardown()
