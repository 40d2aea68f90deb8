"""A sweep's spec: a base recipe and options, a search space, a sampler, a pruner, a metric.

    # sweep.yaml
    recipe: he2015-cifar10-resnet20     # optional: a packaged recipe or a YAML file
    options: {epochs: 1, val_split: 5000, dataset: folder, data_dir: data/cifar10-jpeg}
    space:
      lr: {low: 0.02, high: 0.8, log: true}          # float (int when low and high are ints)
      weight_decay: {values: [0.0, 1.0e-4, 5.0e-4]}  # a list: categorical, and what --sampler grid walks
      batch_size: {choices: [64, 128]}
    sampler: tpe          # tpe | random | grid
    trials: 8
    metric: top1          # the held-out split's top1 (maximised) | loss | top1_err (minimised)
    pruner: {type: median, startup_trials: 2, warmup_steps: 0}   # or hyperband (min_resource, reduction_factor), none
    seed: 0
    storage: ""           # any database URL Optuna takes (default: sqlite:///<sweep-dir>/study.db)
    study: ""             # study name (default: the spec file's name)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cnntrain.config import config_field_names
from cnntrain.errors import ConfigError

SAMPLERS = ("tpe", "random", "grid")
METRICS = {"top1": "maximize", "loss": "minimize", "top1_err": "minimize"}
PRUNERS = ("median", "hyperband", "none")


@dataclass
class SweepSpec:
    space: dict[str, dict[str, Any]]
    recipe: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    sampler: str = "tpe"
    trials: int = 10
    metric: str = "top1"
    pruner: dict[str, Any] = field(default_factory=lambda: {"type": "median"})
    seed: int = 0
    storage: str = ""
    study: str = "sweep"

    @property
    def direction(self) -> str:
        return METRICS[self.metric]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self, where: str) -> SweepSpec:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"{where}: sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if self.metric not in METRICS:
            raise ConfigError(f"{where}: metric {self.metric!r} is not one of {', '.join(METRICS)}")
        if self.pruner.get("type", "median") not in PRUNERS:
            raise ConfigError(f"{where}: pruner type {self.pruner.get('type')!r} is not one of {', '.join(PRUNERS)}")
        if self.trials <= 0:
            raise ConfigError(f"{where}: trials must be positive")
        if not self.space:
            raise ConfigError(f"{where}: the search space (space:) is empty")
        known = set(config_field_names())
        for name in {**self.space, **self.options}:
            if name not in known:
                raise ConfigError(f"{where}: {name!r} is not a training option (`cnntrain train --help` lists them)")
        for name, dist in self.space.items():
            ranged = isinstance(dist, dict) and {"low", "high"} <= dist.keys()
            if not isinstance(dist, dict) or not (ranged or {"values", "choices"} & dist.keys()):
                raise ConfigError(f"{where}: space.{name} needs low and high, or values (a list)")
            if self.sampler == "grid" and not ({"values", "choices"} & dist.keys()):
                raise ConfigError(f"{where}: sampler grid needs a list of values for space.{name}")
        return self

    def grid(self) -> dict[str, list]:
        return {name: list(d.get("values", d.get("choices"))) for name, d in self.space.items()}

    def grid_size(self) -> int:
        size = 1
        for values in self.grid().values():
            size *= len(values)
        return size

    def suggest(self, trial) -> dict[str, Any]:
        """This trial's hyperparameters (the stored ones for a trial already sampled)."""
        out = {}
        for name, d in self.space.items():
            if "values" in d or "choices" in d:
                out[name] = trial.suggest_categorical(name, list(d.get("values", d.get("choices"))))
            elif isinstance(d["low"], int) and isinstance(d["high"], int) and d.get("type") != "float":
                out[name] = trial.suggest_int(name, d["low"], d["high"], step=d.get("step", 1), log=d.get("log", False))
            else:
                out[name] = trial.suggest_float(name, float(d["low"]), float(d["high"]), step=d.get("step"),
                                                log=d.get("log", False))
        return out


def load_spec(path: str | Path, **overrides: Any) -> SweepSpec:
    """The spec in ``path`` with ``overrides`` (None: keep) applied and checked."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"sweep spec {path}: cannot read it ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sweep spec {path}: expected a mapping (space:, options:, ...)")
    names = {f.name for f in dataclasses.fields(SweepSpec)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"sweep spec {path}: unknown keys {', '.join(sorted(unknown))} (known: "
                          f"{', '.join(sorted(names))})")
    data.setdefault("study", path.stem)
    if isinstance(data.get("pruner"), str):
        data["pruner"] = {"type": data["pruner"]}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return SweepSpec(**data).check(str(path))
