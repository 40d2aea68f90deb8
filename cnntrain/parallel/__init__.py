"""How processes cooperate: strategies (single process, DDP and its variants, partial update, the
async parameter server) and the one module that reads launcher environments."""

from cnntrain.parallel.base import Strategy
from cnntrain.parallel.env import LaunchEnv, detect_launch
from cnntrain.parallel.strategy import make_strategy

__all__ = ["LaunchEnv", "Strategy", "detect_launch", "make_strategy"]
