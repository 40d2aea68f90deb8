"""A sweep's worker process (``python -m cnntrain.sweep SWEEP_DIR INDEX``, started by ``cnntrain sweep``).

It takes the next trial from the study, trains it in process with a callback that reports each
evaluation to Optuna and stops the run through ``loop.request_stop`` when the pruner says so, then
tells the study the result and writes ``trial.json`` (and ``PRUNED`` for a pruned trial) into the
trial's run folder. A worker holds a lock file per trial while it runs it: a trial still RUNNING in
the study whose lock is free (and, in a shared ``--storage``, whose folder is here) was interrupted,
and the next worker adopts it (resumed from its checkpoint, exactly) before asking the study for a
new one; that includes a trial killed between the study's ask and the making of its folder.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from cnntrain.api import train
from cnntrain.config import build_config
from cnntrain.engine.callbacks import Callback
from cnntrain.engine.progress import setup_logging
from cnntrain.errors import CnnTrainError
from cnntrain.sweep.driver import PRUNED_FILE, SPEC_FILE, TRIAL_FILE, open_study, optuna_module, trial_dir
from cnntrain.sweep.spec import SweepSpec

log = logging.getLogger("cnntrain")


class ReportToStudy(Callback):
    """Each evaluation's metric to the trial; ``loop.request_stop`` when the pruner says so."""

    def __init__(self, trial, metric: str) -> None:
        self.trial, self.metric = trial, metric

    def on_eval_end(self, loop, result) -> None:
        value = {"top1": result.top1, "loss": result.loss, "top1_err": result.top1_err}[self.metric]
        step = loop.state.step
        with warnings.catch_warnings():  # a resumed trial's steps before its checkpoint were reported already
            warnings.simplefilter("ignore")
            self.trial.report(value, step)
        if step < loop.total_steps and self.trial.should_prune():
            loop.request_stop(f"pruned by the sweep's {self.trial.study.pruner.__class__.__name__} at step {step}")


@contextmanager
def _locked(path: Path):
    """``flock`` on ``path`` while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _take(study, spec: SweepSpec, folder: Path) -> tuple[Any, int, bool] | None:
    """Under the sweep's lock: an interrupted trial to adopt, else a new one while the budget lasts.
    Returns (trial, lock fd held for it, adopted), or None when the study has its trials."""
    optuna = optuna_module()
    # A study in this folder's own study.db holds this sweep's trials only; in a shared --storage a
    # trial is this folder's when its trial folder is here (others' run on other machines).
    own_study = not spec.storage
    with _locked(folder / ".sweep.lock"):
        trials = study.get_trials(deepcopy=False)
        for t in trials:
            if t.state == optuna.trial.TrialState.RUNNING and (own_study or trial_dir(folder, t.number).is_dir()):
                fd = _try_lock(folder / "locks" / f"trial-{t.number:04d}.lock")
                if fd is not None:  # killed, possibly before its folder was made: adopt it
                    trial_dir(folder, t.number).mkdir(parents=True, exist_ok=True)
                    return optuna.trial.Trial(study, t._trial_id), fd, True
        if len(trials) >= spec.trials:
            return None
        trial = study.ask()
        # Its folder first, so that a kill from here on leaves a trial a shared study knows as ours.
        trial_dir(folder, trial.number).mkdir(parents=True, exist_ok=True)
        fd = _try_lock(folder / "locks" / f"trial-{trial.number:04d}.lock")
        spec.suggest(trial)  # drawn now, under the lock: the next ask sees them
        return trial, fd, False


def _try_lock(path: Path) -> int | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _tell(study, trial, value: float | None = None, state=None) -> None:
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as exc:  # the grid sampler stops the study once its grid is done: told already
        if "Study.stop" not in str(exc):
            raise


def run_trial(study, trial, spec: SweepSpec, folder: Path, adopted: bool) -> dict[str, Any]:
    """Train one trial in its run folder (resumed when adopted) and tell the study; its trial.json."""
    optuna = optuna_module()
    params = spec.suggest(trial)
    run_dir = trial_dir(folder, trial.number)
    log.info("trial %d%s: %s", trial.number, " (resumed)" if adopted else "", params)
    record = {"number": trial.number, "params": params, "metric": spec.metric, "direction": spec.direction,
              "run_dir": str(run_dir)}
    try:
        if adopted and (run_dir / "summary.json").is_file():  # trained to the end, killed before the tell
            summary = json.loads((run_dir / "summary.json").read_text())
        else:
            cfg = build_config(spec.recipe or None, **{**spec.options, **params, "run_dir": str(run_dir),
                                                       "resume": "auto" if adopted else ""})
            summary = train(cfg, callbacks=[ReportToStudy(trial, spec.metric)]).summary
    except CnnTrainError as exc:  # a diverged or refused trial fails; the sweep goes on
        _tell(study, trial, state=optuna.trial.TrialState.FAIL)
        record.update(state="FAIL", value=None, error=str(exc))
    else:
        stopped = summary.get("stopped") or ""
        metric = {"top1": summary.get("final_top1"), "loss": summary.get("final_loss"),
                  "top1_err": None if summary.get("final_top1") is None else 1 - summary["final_top1"]}[spec.metric]
        if stopped.startswith("pruned"):
            _tell(study, trial, state=optuna.trial.TrialState.PRUNED)
            (run_dir / PRUNED_FILE).write_text(stopped + "\n")
            record.update(state="PRUNED", value=metric, stopped=stopped)
        elif metric is None:
            _tell(study, trial, state=optuna.trial.TrialState.FAIL)
            record.update(state="FAIL", value=None, error="no evaluation: give the data set a held-out split")
        else:
            _tell(study, trial, metric)
            record.update(state="COMPLETE", value=metric)
        record.update(steps=summary.get("steps"), best_top1=summary.get("best_top1"))
    tmp = run_dir / f".{TRIAL_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, run_dir / TRIAL_FILE)
    return record


def worker(folder: str | Path, index: int = 0) -> None:
    """Take trials from the sweep in ``folder`` until the study has all of them."""
    setup_logging()
    folder = Path(folder)
    spec = SweepSpec(**yaml.safe_load((folder / SPEC_FILE).read_text()))
    study = open_study(spec, folder, worker=index)
    while (taken := _take(study, spec, folder)) is not None:
        trial, fd, adopted = taken
        try:
            run_trial(study, trial, spec, folder, adopted)
        finally:
            os.close(fd)
