"""`cnntrain sweep SPEC.yaml`: hyperparameter search on Optuna, every trial an ordinary run folder.

    cnntrain sweep sweep.yaml --trials 8 --parallel 2          # two local trial processes
    cnntrain sweep sweep.yaml --storage postgresql://host/db   # several machines on one study
    cnntrain report runs/sweep-sweep                           # the trials' table, best config, plots

The sweep folder holds ``sweep.yaml`` (the resolved spec), ``study.db`` (the default SQLite storage)
and ``trial-NNNN/`` per trial: a run folder like any other (config.yaml, metrics.csv, checkpoints,
summary.json) plus ``trial.json`` (its number, state, value and parameters) and, when the pruner
stopped it, a ``PRUNED`` file. Each worker process takes the next trial from the study, trains it in
process (``worker.py``) with a callback that reports each evaluation to Optuna and stops the run
through ``loop.request_stop`` when the pruner says so, then tells the study the result.

A killed sweep, run again, keeps its finished trials and resumes each interrupted one from its
run folder's checkpoint (``--resume auto``, exact): a worker holds a lock file per trial while it
runs it, so a trial still RUNNING in the study whose lock is free (and, in a shared ``--storage``,
whose folder is here) was interrupted, and the next worker adopts it before asking for a new one.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from cnntrain.engine.progress import setup_logging
from cnntrain.errors import CnnTrainError, ConfigError
from cnntrain.sweep.spec import SweepSpec, load_spec

log = logging.getLogger("cnntrain")

SPEC_FILE = "sweep.yaml"
TRIAL_FILE = "trial.json"
PRUNED_FILE = "PRUNED"


def optuna_module():
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
    optuna = optuna_module()
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
