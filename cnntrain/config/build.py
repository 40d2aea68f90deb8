"""A config from layers: defaults, then the data set's defaults, then a YAML recipe, then flags.

The resolved config is written to ``<run_dir>/config.yaml`` and stored in every checkpoint, so a
run can be reproduced with ``cnntrain train --config <run_dir>/config.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cnntrain.config.train import OPTIONS, SECTION_OF, SECTIONS, TrainConfig, coerce_option, option_default
from cnntrain.errors import ConfigError, did_you_mean

RECIPE_DIR = Path(__file__).parent.parent / "recipes"
# Defaults that suit a data set better than the CIFAR-oriented ones; a recipe or a flag still
# overrides them. MNIST-sized sets train in few steps, so smaller batches do better.
DATASET_DEFAULTS = {
    "mnist": {"batch_size": 32, "lr": 0.05, "augment": "none"},
    "fashion-mnist": {"batch_size": 32, "lr": 0.05, "augment": "none"},
}


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
    """Read a YAML recipe safely (no Python tags) into a dict of flat options.

    Options are listed flat (``lr: 0.1``) or under their section (``optim: {lr: 0.1}``)."""
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not a valid recipe ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of option: value")
    return flatten_sections(data, where=f"{path}: ")


def flatten_sections(options: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}, "seed": 1}`` -> ``{"lr": 0.1, "seed": 1}``; dashes in names become underscores."""
    flat: dict[str, Any] = {}
    for key, value in options.items():
        key = str(key).replace("-", "_")
        if key not in SECTIONS or not isinstance(value, dict):
            flat[key] = value
            continue
        for name, inner in value.items():
            name = str(name).replace("-", "_")
            if SECTION_OF.get(name) != key:
                names = [n for n, s in SECTION_OF.items() if s == key]
                home = f" (it is in section {SECTION_OF[name]!r})" if name in SECTION_OF else did_you_mean(name, names)
                raise ConfigError(f"{where}section {key!r} has no option {name!r}{home}")
            flat[name] = inner
    return flat


def build_config(recipe: str | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the data set's defaults, then ``recipe`` (name or path), then ``overrides``
    (flat options; None values are ignored)."""
    values: dict[str, Any] = {}
    if recipe:
        values.update(load_recipe(recipe))
    values.update(flatten_sections({k: v for k, v in overrides.items() if v is not None}))
    return TrainConfig.from_options(_workers_as_processes(_with_dataset_defaults(values)))


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a config stored flat (config.yaml, a checkpoint); keys unknown to this version are ignored."""
    return TrainConfig.from_options(_with_dataset_defaults({k: v for k, v in data.items() if k in OPTIONS}))


def save_config(cfg: TrainConfig, path: Path) -> None:
    """Write the flat options as YAML (a recipe that reruns the config; secrets are not written)."""
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _with_dataset_defaults(values: dict[str, Any]) -> dict[str, Any]:
    dataset = values.get("dataset", option_default("dataset"))
    return {**DATASET_DEFAULTS.get(dataset, {}), **values}


def _workers_as_processes(values: dict[str, Any]) -> dict[str, Any]:
    """cifar-tf's ``--strategy async-ps --ps 2 --workers 3``: there --workers counts training processes.

    Read so only while the cluster's workers are not given otherwise (--worker-count or
    --worker-hosts); a config built once already has them, so building it again changes nothing."""
    if values.get("strategy") != "async-ps" or values.get("worker_count") or values.get("worker_hosts"):
        return values
    if "workers" not in values or coerce_option("workers", values["workers"]) == option_default("workers"):
        return values
    values = dict(values)
    values["worker_count"] = values.pop("workers")
    return values
