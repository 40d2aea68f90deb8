"""One exception type per family of failure; the CLI prints them as one line and exits non-zero."""


class CnnTrainError(Exception):
    """Base of every error cnntrain raises on purpose. Its message is meant for the user."""

    exit_code = 1


class ConfigError(CnnTrainError):
    """A bad flag, flag combination, recipe or name."""

    exit_code = 2


class DataError(CnnTrainError):
    """A data file is missing, corrupt, hostile or inconsistent."""


class CheckpointError(CnnTrainError):
    """A checkpoint cannot be written or read."""


class DistributedError(CnnTrainError):
    """A peer, rendezvous or collective failed."""


class NumericalError(CnnTrainError):
    """Training diverged (loss not finite for too many steps)."""


def did_you_mean(name: str, choices) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
