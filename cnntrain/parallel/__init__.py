"""Strategies (single process, synchronous data parallel) and launcher detection."""

from cnntrain.parallel.env import LaunchEnv, detect_launch
from cnntrain.parallel.strategy import Strategy, make_strategy

__all__ = ["LaunchEnv", "Strategy", "detect_launch", "make_strategy"]
