"""The training loop, evaluation, optimisation, precision, checkpoints and metrics."""
