"""One typed training config, in sections, checked once when built and never changed after.

Sections (attributes of ``TrainConfig``): ``data``, ``net`` (the model), ``optim``, ``compute``
(precision and speed), ``run`` (seeds, outputs, cadence), ``sync`` (synchronous data parallel) and
``async_ps`` (parameter servers). Options keep their flat names everywhere: ``cfg.lr``,
``--lr``, ``lr:`` in a recipe, config.yaml and checkpoints.

    cfg = build_config("nnabla-cifar10-resnet23", batch_size=64, device="cudnn")
    cfg.batch_size, cfg.optim.batch_size    # 64, 64
    cfg.replace(seed=1)                     # a new, re-checked config
"""

from __future__ import annotations

from cnntrain.config.build import (
    DATASET_DEFAULTS,
    RECIPE_DIR,
    build_config,
    config_from_dict,
    flatten_sections,
    load_recipe,
    recipe_path,
    save_config,
)
from cnntrain.config.options import FrozenDict
from cnntrain.config.sections import (
    DEVICE_ALIASES,
    AsyncPsConfig,
    ComputeConfig,
    DataConfig,
    NetConfig,
    OptimConfig,
    RunConfig,
    SyncConfig,
)
from cnntrain.config.train import CHOICES, OPTIONS, SECTION_OF, SECTIONS, TrainConfig, config_field_names

__all__ = ["CHOICES", "DATASET_DEFAULTS", "DEVICE_ALIASES", "OPTIONS", "RECIPE_DIR", "SECTIONS", "SECTION_OF",
           "AsyncPsConfig", "ComputeConfig", "DataConfig", "FrozenDict", "NetConfig", "OptimConfig", "RunConfig",
           "SyncConfig", "TrainConfig", "build_config", "config_field_names", "config_from_dict", "flatten_sections",
           "load_recipe", "recipe_path", "save_config"]
