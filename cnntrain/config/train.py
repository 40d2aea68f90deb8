"""``TrainConfig``: the seven sections together, read flat (``cfg.lr``), checked once, never changed.

    cfg = build_config("he2015-cifar10-resnet20", lr=0.05)
    cfg.lr, cfg.optim.lr          # the same option, flat or through its section
    cfg.replace(seed=1)           # a new config, checked again; cfg itself does not change
    cfg.to_dict()                 # the flat options, as config.yaml and checkpoints store them
"""

from __future__ import annotations

import copy
import typing
from dataclasses import Field, dataclass, field, fields
from typing import Any

from cnntrain.config.options import coerce, flag
from cnntrain.config.sections import (
    DEVICE_ALIASES,
    AsyncPsConfig,
    ComputeConfig,
    DataConfig,
    NetConfig,
    OptimConfig,
    RunConfig,
    Section,
    SyncConfig,
)
from cnntrain.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run, in sections; ``cfg.<option>`` reads an option of any section."""

    data: DataConfig = field(default_factory=DataConfig)
    net: NetConfig = field(default_factory=NetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    async_ps: AsyncPsConfig = field(default_factory=AsyncPsConfig)

    def __post_init__(self) -> None:
        _validate_across_sections(self)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: the flat name of an option lives in its section.
        section = SECTION_OF.get(name)
        if section is None or section not in self.__dict__:  # not an option, or mid-unpickling
            if name.startswith("__"):
                raise AttributeError(name)
            raise AttributeError(f"TrainConfig has no option {name!r}{did_you_mean(name, OPTIONS)}")
        return getattr(self.__dict__[section], name)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TrainConfig:
        """Build from flat options (``{"lr": 0.1, "device": "cudnn"}``); the others keep their defaults.

        Values are converted to each option's type and the device alias resolved before any
        section is built, so a built config is final."""
        for name in options:
            if name not in OPTIONS:
                raise ConfigError(f"unknown option {name!r}{did_you_mean(name, OPTIONS)}")
        values = {name: coerce_option(name, value) for name, value in options.items()}
        if "device" in values:
            values["device"] = DEVICE_ALIASES.get(values["device"], values["device"])
        return cls(**{name: section(**{f.name: values[f.name] for f in fields(section) if f.name in values})
                      for name, section in SECTIONS.items()})

    def options(self) -> dict[str, Any]:
        """Every flat option, secrets included: for building the same config again."""
        return {name: getattr(getattr(self, section), name) for name, section in SECTION_OF.items()}

    def replace(self, **options: Any) -> TrainConfig:
        """A copy with some flat options changed (``cfg.replace(seed=cfg.seed + 1)``), checked again."""
        return TrainConfig.from_options({**self.options(), **options})

    def to_dict(self) -> dict[str, Any]:
        """The flat options as plain YAML-safe values, secrets (``ps_token``) left out: what config.yaml,
        checkpoints and recipes hold, and what ``config_from_dict`` reads back."""
        return {name: _plain(value) for name, value in self.options().items() if name not in SECRETS}


def _index_options(sections: dict[str, type[Section]]) -> tuple[dict[str, str], dict[str, Field], dict[str, Any]]:
    """Flat name -> (its section's attribute, its declaration, its type), refusing a name given twice."""
    section_of: dict[str, str] = {}
    declared: dict[str, Field] = {}
    hints: dict[str, Any] = {}
    for section, cls in sections.items():
        types = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name in declared:
                raise TypeError(f"option {f.name!r} is in sections {section_of[f.name]!r} and {section!r}")
            if f.name in sections or hasattr(TrainConfig, f.name):  # a section or a method would hide it
                raise TypeError(f"option {f.name!r} is hidden by TrainConfig.{f.name}")
            section_of[f.name], declared[f.name], hints[f.name] = section, f, types[f.name]
    return section_of, declared, hints


SECTIONS: dict[str, type[Section]] = {f.name: f.default_factory for f in fields(TrainConfig)}
# Flat option name -> the TrainConfig attribute of its section; -> its declaration (default,
# metadata["help"], ...); -> its type.
SECTION_OF, OPTIONS, HINTS = _index_options(SECTIONS)
SECRETS = frozenset(name for name, f in OPTIONS.items() if f.metadata["secret"])
CHOICES = {name: f.metadata["choices"] for name, f in OPTIONS.items() if f.metadata["choices"]}


def config_field_names() -> list[str]:
    """The flat option names, section by section: the flags of ``cnntrain train``."""
    return list(OPTIONS)


def coerce_option(name: str, value: Any) -> Any:
    return coerce(name, value, HINTS[name])


def option_default(name: str) -> Any:
    f = OPTIONS[name]
    return f.default_factory() if callable(f.default_factory) else f.default


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return copy.deepcopy(dict(value))
    return value


def _validate_across_sections(cfg: TrainConfig) -> None:
    """The rules that join options of two sections; each section has checked its own already."""
    if cfg.partial_update and (cfg.ema_decay or cfg.lookahead):
        raise ConfigError("--partial-update with --ema-decay or --lookahead: each rank would average its own "
                          "weights; drop one")
    if cfg.grad_compression in ("topk", "threshold") and cfg.precision == "fp16":
        raise ConfigError(f"--grad-compression {cfg.grad_compression} keeps unsent gradient entries across steps, "
                          f"which fp16's changing loss scale would corrupt: use --precision fp32 or bf16")
    if cfg.sync_bn and cfg.device == "cpu":
        raise ConfigError("--sync-bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel): "
                          "drop --sync-bn on CPU")
    if cfg.strategy == "async-ps":
        # The weights live on the ps and change under the workers: an average of them (EMA, lookahead)
        # or an exchange between workers has nothing to act on. Accumulation, clipping, LARC,
        # --norm-lr-scale and timed parameter groups work (the step and the ps's optimizer do them).
        sync_only = {"ema_decay": cfg.ema_decay != 0, "lookahead": cfg.lookahead != 0, "sync_bn": cfg.sync_bn,
                     "grad_compression": cfg.grad_compression != "none", "partial_update": cfg.partial_update,
                     "profile": cfg.profile != "none", "early_stop": cfg.early_stop != 0}
        for name, used in sync_only.items():
            if used:
                raise ConfigError(f"{flag(name)} is not supported with --strategy async-ps "
                                  f"(it belongs to synchronous training)")
        if cfg.lr_schedule == "plateau":
            raise ConfigError("--lr-schedule plateau is not supported with --strategy async-ps (the ps computes the "
                              "LR from the update count alone)")
        # The ps builds its own copy of the weights and regroups them in shards: fine-tuning's starting
        # weights, frozen parts and per-layer rates are set up by the synchronous trainer only.
        finetune = {"pretrained": bool(cfg.pretrained), "init_from": bool(cfg.init_from),
                    "freeze": cfg.freeze != "none", "unfreeze_at": cfg.unfreeze_at != 0,
                    "head_lr_mult": cfg.head_lr_mult != 1, "layer_decay": cfg.layer_decay != 1}
        for name, used in finetune.items():
            if used:
                raise ConfigError(f"{flag(name)} is not supported with --strategy async-ps (fine-tuning runs "
                                  f"under synchronous training)")
