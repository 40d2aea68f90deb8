"""One typed training config: defaults, then a YAML recipe, then command-line flags.

The resolved config is written to ``<run_dir>/config.yaml`` and stored in every checkpoint, so a
run can be reproduced with ``cnntrain train --config <run_dir>/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cnntrain.errors import ConfigError, did_you_mean

RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass
class TrainConfig:
    # --- data -------------------------------------------------------------------------------
    dataset: str = "cifar10"  # mnist | fashion-mnist | cifar10 | cifar100 | folder | synthetic | ...
    data_dir: str = "data"
    download: bool = True  # fetch missing official files (always checksum-verified)
    verify: bool = True  # checksum local official files before use
    val_split: int = 0  # images held out of the training set for validation (0: use the test split)
    label_mode: str = "fine"  # CIFAR-100 labels: fine (100) | coarse (20)
    image_size: int = 0  # resize folder images to this square size (0: keep)
    synthetic_size: int = 2048  # synthetic: training images (test split is a quarter of it)
    synthetic_shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    synthetic_classes: int = 10
    augment: str = "auto"  # auto | none | flip | crop-flip | translate-flip
    pad: int = 4  # pixels of padding for crop / translate augmentation
    cutout: int = 0  # side of the square cut out of each training image (0: off)
    rotate: float = 0.0  # in-memory sets: rotate each training image by a random angle in [-R, R] radians (NNabla)
    alternate_flip: bool = False  # in-memory sets: mirror each image in every other epoch (random start)
    drop_last: bool = False  # drop the last partial batch of each epoch (fixed shapes for compile)
    # --- input pipeline ----------------------------------------------------------------------
    pipeline: str = "auto"  # auto (stream large or mixed-size folders) | memory | stream (DataLoader workers)
    workers: int = -1  # DataLoader worker processes per rank for streamed data (-1: auto; 0: main process)
    min_crop_scale: float = 0.08  # streamed training: smallest crop area (fraction of the image)
    crop: str = "random-resized"  # streamed training: random-resized | bbox-distort (keeps a tenth of an object box)
    decode: str = "host"  # streamed sets: host (workers decode) | device (JPEGs decoded on the device: nvJPEG on CUDA)
    # --- model ------------------------------------------------------------------------------
    model: str = "resnet20"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # --- optimisation ----------------------------------------------------------------------
    epochs: float = 10
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    batch_size: int = 128  # per process and micro-batch
    accum_steps: int = 1  # micro-batches per optimizer step (gradient accumulation): global batch x this
    lr: float = 0.1  # peak learning rate for the whole (global) batch, before --scale-lr
    scale_lr: float = 0  # linear scaling rule: lr *= global_batch / scale_lr (0: off)
    optimizer: str = "sgd"  # sgd | nesterov | adam | adamw
    momentum: float = 0.9
    weight_decay: float = 5e-4
    decay_bn_bias: bool = True  # apply weight decay to BatchNorm weights and biases too
    norm_lr_scale: float = 1.0  # LR multiplier for normalisation-layer parameters (BatchNorm shifts and scales)
    lr_schedule: str = "cosine"  # constant | step | multistep | cosine | poly | onecycle
    lr_milestones: list[float] = field(default_factory=list)  # epochs, for step / multistep
    lr_step_epochs: float = 30  # step: decay every this many epochs
    lr_gamma: float = 0.1  # step / multistep decay factor
    lr_power: float = 2.0  # poly: (1 - t)^power, as nvcnn
    lr_final: float = 0.0  # cosine / poly / onecycle end at lr * lr_final
    warmup_epochs: float = 0  # linear warm-up from 0 over this many epochs
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max global gradient norm (0: off)
    ema_decay: float = 0.0  # exponential moving average of weights (0: off), evaluated instead
    lookahead: int = 0  # every this many steps pull the weights back toward a slow copy (0: off)
    lookahead_alpha: float = 0.95  # per-step lookahead rate; the pull ramps as (alpha^k) * (step/total)^3
    tta_flip: bool = False  # evaluate each image and its mirror image, logits averaged
    tta_translate: int = 0  # also evaluate the views shifted by this many pixels (0: off)
    larc_mode: str = "none"  # none | clip | scale
    larc_eta: float = 0.003
    larc_eps: float = 1e-8
    # --- precision and speed ----------------------------------------------------------------
    device: str = "auto"  # auto | cpu | cuda (cudnn is an alias of cuda)
    precision: str = "fp32"  # fp32 | fp16 | bf16 (autocast; fp32 master weights)
    loss_scale: float = 0.0  # fp16 static loss scale (0: dynamic)
    channels_last: bool = True
    compile: bool = False
    threads: int = 0  # intra-op CPU threads (0: one per core this process may use)
    deterministic: bool = False
    # --- run and outputs -------------------------------------------------------------------
    seed: int = 0
    run_dir: str = ""  # default runs/<dataset>-<model>-<timestamp>
    display_every: int = 50  # steps between log lines
    eval_every: int = 0  # steps between evaluations (0: at each epoch end)
    save_every: int = 0  # steps between checkpoints (0: at each epoch end)
    save_interval: float = 0.0  # also checkpoint when this many seconds have passed (0: off; ranks>1: at a log line)
    keep_last: int = 3  # checkpoints kept besides best.pt
    resume: str = ""  # "" | auto | path to a checkpoint or run folder
    max_bad_steps: int = 20  # stop when the loss is not finite this many steps in a row
    progress: str = "auto"  # auto | bar | log | none
    tensorboard: bool = False
    profile: str = "none"  # none | phases (data/forward/backward/communication/optimizer) | ops (torch.profiler)
    # --- distributed ------------------------------------------------------------------------
    dist_backend: str = "auto"  # auto | gloo | nccl
    dist_timeout: float = 300.0  # seconds before a lost peer ends the job
    bucket_mb: float = 25.0  # DDP gradient bucket size in MB (powersgd on gloo: one bucket)
    overlap: bool = True  # all-reduce overlapped with backward (DDP buckets)
    grad_compression: str = "none"  # none | fp16 | bf16 | powersgd | topk | threshold
    compression_ratio: float = 0.05  # topk: fraction of each gradient bucket sent; --partial-update: of params averaged
    compression_threshold: float = 0.0  # threshold: gradient entries with |g| >= this are sent (required, > 0)
    partial_update: bool = False  # local optimizer steps; one chunk of the parameters averaged across ranks per step
    sync_bn: bool = False  # SyncBatchNorm across ranks (CUDA only)
    # --- asynchronous parameter server (--strategy async-ps) ---------------------------------
    strategy: str = "sync"  # sync (one process, or data parallel under a launcher) | async-ps (parameter servers)
    role: str = ""  # async-ps: ps | chief | worker | evaluator ("": start every role on this machine)
    ps_index: int = -1  # --role ps: which parameter server this is (0-based)
    worker_index: int = -1  # --role worker: which worker this is (1-based; the chief is worker 0)
    ps_hosts: str = ""  # the parameter servers, host:port,host:port (the same on every role)
    worker_hosts: str = ""  # the training processes, host[:port],... chief first (they only connect out)
    ps_count: int = 0  # instead of --ps-hosts: this many ps on 127.0.0.1 from --dist-start-port (cifar-tf)
    worker_count: int = 0  # instead of --worker-hosts: this many training processes on 127.0.0.1, chief included
    dist_start_port: int = 0  # first ps port with --ps-count (0: 2222; free ports when every role starts here)
    max_staleness: int = -1  # apply no gradient more than this many updates after its weights were pulled (-1: off)
    evaluator: bool = False  # every role on this machine: also start an evaluator

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "optimizer": ("sgd", "nesterov", "adam", "adamw"),
    "lr_schedule": ("constant", "step", "multistep", "cosine", "poly", "onecycle"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("fp32", "fp16", "bf16"),
    "augment": ("auto", "none", "flip", "crop-flip", "translate-flip"),
    "label_mode": ("fine", "coarse"),
    "pipeline": ("auto", "memory", "stream"),
    "crop": ("random-resized", "bbox-distort"),
    "decode": ("host", "device"),
    "larc_mode": ("none", "clip", "scale"),
    "progress": ("auto", "bar", "log", "none"),
    "dist_backend": ("auto", "gloo", "nccl"),
    "grad_compression": ("none", "fp16", "bf16", "powersgd", "topk", "threshold"),
    "profile": ("none", "phases", "ops"),
    "strategy": ("sync", "async-ps"),
    "role": ("", "ps", "chief", "worker", "evaluator"),
}
DEVICE_ALIASES = {"cudnn": "cuda", "gpu": "cuda"}
# Defaults that suit a data set better than the CIFAR-oriented ones above; a recipe or a flag
# still overrides them. MNIST-sized sets train in few steps, so smaller batches do better.
DATASET_DEFAULTS = {
    "mnist": {"batch_size": 32, "lr": 0.05, "augment": "none"},
    "fashion-mnist": {"batch_size": 32, "lr": 0.05, "augment": "none"},
}
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def recipe_path(name_or_path: str) -> Path:
    """Resolve a recipe given as a file path or as the name of a packaged recipe."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = RECIPE_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if packaged.is_file():
        return packaged
    names = [p.stem for p in RECIPE_DIR.glob("*.yaml")]
    raise ConfigError(f"recipe {name_or_path!r} is neither a file nor a packaged recipe"
                      f"{did_you_mean(path.stem, names)}; `cnntrain recipes` lists them")


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """Read a YAML recipe safely (no Python tags) into a dict of config overrides."""
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not a valid recipe ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(recipe: str | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then ``recipe`` (name or path), then ``overrides`` (None values are ignored)."""
    values: dict[str, Any] = {}
    if recipe:
        values.update(load_recipe(recipe))
    values.update({k.replace("-", "_"): v for k, v in overrides.items() if v is not None})
    dataset = values.get("dataset", TrainConfig.dataset)
    values = {**DATASET_DEFAULTS.get(dataset, {}), **values}
    cfg = TrainConfig()
    for key, value in values.items():
        if key not in _FIELDS:
            raise ConfigError(f"unknown option {key!r}{did_you_mean(key, _FIELDS)}")
        setattr(cfg, key, _coerce(key, value))
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    cfg.device = DEVICE_ALIASES.get(cfg.device, cfg.device)
    for key, allowed in CHOICES.items():
        value = getattr(cfg, key)
        if value not in allowed:
            raise ConfigError(f"--{key.replace('_', '-')} {value!r} is not one of {', '.join(allowed)}"
                              f"{did_you_mean(str(value), allowed)}")
    positive = ("batch_size", "display_every", "accum_steps")
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {getattr(cfg, key)}")
    if cfg.epochs <= 0 and cfg.max_steps <= 0:
        raise ConfigError("nothing to train: give --epochs > 0 or --max-steps > 0")
    if cfg.lr <= 0:
        raise ConfigError(f"--lr must be positive, got {cfg.lr}")
    if cfg.norm_lr_scale <= 0:
        raise ConfigError(f"--norm-lr-scale must be positive, got {cfg.norm_lr_scale}")
    if cfg.loss_scale and cfg.precision != "fp16":
        raise ConfigError("--loss-scale applies to --precision fp16 only")
    if cfg.lr_schedule == "multistep" and not cfg.lr_milestones:
        raise ConfigError("--lr-schedule multistep needs --lr-milestones (epochs, e.g. 100 150)")
    if not 0 <= cfg.ema_decay < 1:
        raise ConfigError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if cfg.lookahead < 0 or not 0 < cfg.lookahead_alpha < 1:
        raise ConfigError(f"--lookahead must be >= 0 and --lookahead-alpha in (0, 1), got {cfg.lookahead} and "
                          f"{cfg.lookahead_alpha}")
    _validate_exchange(cfg)
    from cnntrain.parallel.ps.cluster import validate_async_ps  # here: that module imports this one

    validate_async_ps(cfg)


def _validate_exchange(cfg: TrainConfig) -> None:
    """Sparsified / partial exchange options and what they cannot be combined with."""
    if not 0 < cfg.compression_ratio <= 1:
        raise ConfigError(f"--compression-ratio must be in (0, 1], got {cfg.compression_ratio}")
    if cfg.grad_compression == "threshold" and cfg.compression_threshold <= 0:
        raise ConfigError(f"--grad-compression threshold needs --compression-threshold T > 0 (gradient entries "
                          f"with |g| >= T are sent), got {cfg.compression_threshold}")
    if cfg.partial_update and cfg.grad_compression != "none":
        raise ConfigError(f"--partial-update averages parameters, not gradients: it cannot be combined with "
                          f"--grad-compression {cfg.grad_compression}; drop one")
    if cfg.partial_update and (cfg.ema_decay or cfg.lookahead):
        raise ConfigError("--partial-update with --ema-decay or --lookahead: each rank would average its own "
                          "weights; drop one")
    if cfg.grad_compression in ("topk", "threshold") and cfg.precision == "fp16":
        raise ConfigError(f"--grad-compression {cfg.grad_compression} keeps unsent gradient entries across steps, "
                          f"which fp16's changing loss scale would corrupt: use --precision fp32 or bf16")


def _coerce(key: str, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, with an error naming the option."""
    hint = _HINTS[key]
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint in (int, float, str):
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return hint(value)
        if origin is list:
            (item,) = typing.get_args(hint)
            items = value if isinstance(value, (list, tuple)) else [value]
            return [item(v) for v in items]
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
        if origin in (typing.Union, types.UnionType):
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"option {key!r}: cannot use {value!r} as {getattr(hint, '__name__', hint)}") from None
    return value


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a config stored in a checkpoint; keys unknown to this version are ignored."""
    return build_config(**{k: v for k, v in data.items() if k in _FIELDS})
