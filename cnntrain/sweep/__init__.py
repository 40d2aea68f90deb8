"""Hyperparameter sweeps on Optuna (``cnntrain sweep SPEC.yaml``): see ``driver.py`` and ``spec.py``."""
