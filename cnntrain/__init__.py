"""cnntrain: train convolutional image classifiers with PyTorch, from one CPU to many GPUs."""

from cnntrain.api import evaluate, load, load_weights, train
from cnntrain.config import TrainConfig, build_config
from cnntrain.engine.callbacks import Callback
from cnntrain.errors import CheckpointError, CnnTrainError, ConfigError, DataError, DistributedError
from cnntrain.models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["Callback", "CheckpointError", "CnnTrainError", "ConfigError", "DataError", "DistributedError",
           "TrainConfig", "build_config", "create_model", "evaluate", "list_models", "load", "load_weights", "train"]
