"""`cnntrain sweep SPEC.yaml`: hyperparameter search on Optuna, every trial an ordinary run folder.

    cnntrain sweep sweep.yaml --trials 8 --parallel 2          # two local trial processes
    cnntrain sweep sweep.yaml --storage postgresql://host/db   # several machines on one study
    cnntrain report runs/sweep-sweep                           # the trials' table, best config, plots

The sweep folder holds ``sweep.yaml`` (the resolved spec), ``study.db`` (the default SQLite storage)
and ``trial-NNNN/`` per trial: a run folder like any other (config.yaml, metrics.csv, checkpoints,
summary.json) plus ``trial.json`` (its number, state, value and parameters) and, when the pruner
stopped it, a ``PRUNED`` file. Each worker process takes the next trial from the study, trains it in
process with a callback that reports each evaluation to Optuna and stops the run through
``loop.request_stop`` when the pruner says so, then tells the study the result.

A killed sweep, run again, keeps its finished trials and resumes each interrupted one from its
run folder's checkpoint (``--resume auto``, exact): a worker holds a lock file per trial while it
runs it, so a trial still RUNNING in the study whose lock is free and whose folder is here was
interrupted, and the next worker adopts it before asking for a new one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from cnntrain.api import train
from cnntrain.config import build_config
from cnntrain.engine.callbacks import Callback
from cnntrain.engine.progress import setup_logging
from cnntrain.errors import CnnTrainError, ConfigError
from cnntrain.sweep.spec import SweepSpec, load_spec

log = logging.getLogger("cnntrain")

SPEC_FILE = "sweep.yaml"
TRIAL_FILE = "trial.json"
PRUNED_FILE = "PRUNED"


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError('cnntrain sweep needs optuna, which is not installed: pip install -e ".[optuna]" '
                          '(or pip install optuna)') from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def trial_dir(sweep_dir: Path, number: int) -> Path:
    return sweep_dir / f"trial-{number:04d}"


def storage_url(spec: SweepSpec, sweep_dir: Path) -> str:
    return spec.storage or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"


def open_study(spec: SweepSpec, sweep_dir: Path, worker: int = 0):
    """The study (created on first use) with the spec's sampler and pruner; ``worker`` varies the
    sampler's seed so that parallel workers do not draw the same points."""
    optuna = _optuna()
    url = storage_url(spec, sweep_dir)
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    storage = optuna.storages.RDBStorage(url, engine_kwargs=engine)
    seed = spec.seed + 1000 * worker  # the grid's order must be the same in every worker: spec.seed
    sampler = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
               "random": lambda: optuna.samplers.RandomSampler(seed=seed),
               "grid": lambda: optuna.samplers.GridSampler(spec.grid(), seed=spec.seed)}[spec.sampler]()
    p = spec.pruner
    pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=p.get("startup_trials", 5),
                                                            n_warmup_steps=p.get("warmup_steps", 0)),
              "hyperband": lambda: optuna.pruners.HyperbandPruner(
                  min_resource=p.get("min_resource", 1), max_resource=p.get("max_resource", "auto"),
                  reduction_factor=p.get("reduction_factor", 3)),
              "none": lambda: optuna.pruners.NopPruner()}[p.get("type", "median")]()
    return optuna.create_study(study_name=spec.study, storage=storage, sampler=sampler, pruner=pruner,
                               direction=spec.direction, load_if_exists=True)


# ---------------------------------------------------------------------- the parent
def run_sweep(spec_path: str | Path, *, sweep_dir: str | Path | None = None, parallel: int = 1,
              timeout: float = 0.0, **overrides: Any) -> Path:
    """Run (or finish) the sweep of ``spec_path`` with ``parallel`` worker processes; its folder."""
    setup_logging()
    spec = load_spec(spec_path, **overrides)
    if spec.sampler == "grid" and spec.trials > spec.grid_size():
        log.info("the grid has %d points: %d trials", spec.grid_size(), spec.grid_size())
        spec.trials = spec.grid_size()
    folder = Path(sweep_dir or Path("runs") / f"sweep-{Path(spec_path).stem}")
    folder.mkdir(parents=True, exist_ok=True)
    previous = folder / SPEC_FILE
    if previous.is_file():
        saved = yaml.safe_load(previous.read_text())
        local = ("threads", "progress", "data_dir", "workers")  # may differ between runs of one sweep
        changed = [k for k in ("space", "recipe", "options", "metric", "study", "storage")
                   if _without(saved.get(k), local) != _without(spec.to_dict()[k], local)]
        if changed:
            raise ConfigError(f"{folder} holds a sweep with a different {', '.join(changed)}: give another "
                              f"--sweep-dir, or the same spec to finish it")
    previous.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    open_study(spec, folder)  # created once, before the workers race for it
    log.info("sweep %s: %d trials, %d at a time, study %r in %s", folder, spec.trials, parallel, spec.study,
             storage_url(spec, folder))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    logs = [open(folder / f"worker-{i}.log", "a") for i in range(parallel)]  # noqa: SIM115 - closed below
    procs = [subprocess.Popen([sys.executable, "-m", "cnntrain.sweep", str(folder), str(i)], stdout=logs[i],
                              stderr=subprocess.STDOUT, env=env) for i in range(parallel)]
    try:
        _follow(folder, procs, timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc, f in zip(procs, logs):
            proc.wait()
            f.close()
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        raise CnnTrainError(f"sweep worker(s) {failed} failed: see {folder}/worker-N.log")
    return folder


def _without(value: Any, keys: tuple[str, ...]) -> Any:
    return {k: v for k, v in value.items() if k not in keys} if isinstance(value, dict) else value


def _follow(folder: Path, procs: list[subprocess.Popen], timeout: float) -> None:
    """Print each trial as it ends, until every worker is done."""
    seen: set[Path] = set()
    started = time.time()
    while True:
        running = any(p.poll() is None for p in procs)
        for path in sorted(folder.glob(f"trial-*/{TRIAL_FILE}")):
            if path not in seen:
                seen.add(path)
                t = json.loads(path.read_text())
                value = "-" if t.get("value") is None else f"{t['value']:.4g}"
                log.info("trial %d %s: %s = %s (%s)", t["number"], t["state"], t.get("metric"), value,
                         ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in t["params"].items()))
        if not running:
            return
        if timeout and time.time() - started > timeout:
            raise CnnTrainError(f"sweep {folder}: not done after --timeout {timeout:.0f} s; run it again to finish")
        time.sleep(1.0)


# ---------------------------------------------------------------------- a worker
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
    optuna = _optuna()
    with _locked(folder / ".sweep.lock"):
        trials = study.get_trials(deepcopy=False)
        for t in trials:
            if t.state == optuna.trial.TrialState.RUNNING and trial_dir(folder, t.number).is_dir():
                fd = _try_lock(folder / "locks" / f"trial-{t.number:04d}.lock")
                if fd is not None:
                    return optuna.trial.Trial(study, t._trial_id), fd, True
        if len(trials) >= spec.trials:
            return None
        trial = study.ask()
        fd = _try_lock(folder / "locks" / f"trial-{trial.number:04d}.lock")
        spec.suggest(trial)  # drawn now, under the lock: the next ask sees them
        trial_dir(folder, trial.number).mkdir(parents=True, exist_ok=True)
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
    optuna = _optuna()
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
