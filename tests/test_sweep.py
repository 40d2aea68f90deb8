"""`cnntrain sweep`: trials in parallel processes on one SQLite study, pruning, the report, and a killed
sweep that, run again, finishes its study without repeating finished trials and resumes the
interrupted one exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import cnntrain
from cnntrain.cli import main
from cnntrain.engine import checkpoint as ckpt
from cnntrain.errors import ConfigError
from cnntrain.sweep.spec import load_spec
from tests.helpers import REPO, metrics_rows, run_cli, weights

UNTIMED = ("img_per_s", "elapsed_s", "data_share")  # a trial's data share is a time too

optuna = pytest.importorskip("optuna")

SPEC = {
    "options": {"dataset": "synthetic", "synthetic_shape": [1, 28, 28], "synthetic_size": 128, "model": "lenet",
                "epochs": 2, "batch_size": 32, "display_every": 4, "eval_every": 2, "save_every": 2,
                "progress": "log", "threads": 1, "seed": 1, "precision": "fp32"},
    # lr 0.0005 learns nothing in 8 steps: the median pruner stops those trials at their first evaluations
    "space": {"lr": {"values": [0.0005, 0.05, 0.2]}, "weight_decay": {"values": [0.0, 0.0005]}},
    "sampler": "grid", "trials": 6, "metric": "top1",
    "pruner": {"type": "median", "startup_trials": 1, "warmup_steps": 0},
}



def _finished(folder: Path) -> dict[int, str]:
    return {int(p.parent.name.split("-")[1]): p.read_text() for p in folder.glob("trial-*/trial.json")}


def _mid_trial(folder: Path) -> bool:
    """Some trial has a checkpoint but no result yet (and two have results)."""
    if len(_finished(folder)) < 2:
        return False
    return any(not (run / "trial.json").exists() and ckpt.latest_valid(run / "checkpoints", quiet=True)
               for run in folder.glob("trial-*"))


@pytest.mark.timeout(420)
def test_parallel_sweep_killed_and_rerun_finishes_without_repeats_and_reports_a_reproducible_best(tmp_path, capsys):
    spec_path, folder = tmp_path / "tiny.yaml", tmp_path / "sweep"
    spec_path.write_text(yaml.safe_dump(SPEC))
    cmd = [sys.executable, "-m", "cnntrain", "sweep", str(spec_path), "--parallel", "2", "--sweep-dir", str(folder)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not _mid_trial(folder):
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and both trial processes
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = _finished(folder)
    interrupted = sorted(int(r.name.split("-")[1]) for r in folder.glob("trial-*") if not (r / "trial.json").exists())
    assert len(before) >= 2 and interrupted

    out = run_cli("sweep", str(spec_path), "--parallel", "2", "--sweep-dir", str(folder), timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert len(states) == 6 and set(states) <= {"COMPLETE", "PRUNED"}, states  # nothing repeated, nothing left
    assert sorted({tuple(sorted(t.params.items())) for t in study.trials}) == sorted(
        {(("lr", a), ("weight_decay", b)) for a in (0.0005, 0.05, 0.2) for b in (0.0, 0.0005)})  # the whole grid
    after = _finished(folder)
    assert {n: after[n] for n in before} == before  # finished trials untouched
    assert "PRUNED" in states
    pruned = [t.number for t in study.trials if t.state.name == "PRUNED"]
    assert all((folder / f"trial-{n:04d}" / "PRUNED").is_file() for n in pruned)
    assert all(json.loads((folder / f"trial-{n:04d}" / "summary.json").read_text())["stopped"].startswith("pruned")
               for n in pruned)
    logs = "".join(p.read_text() for p in folder.glob("worker-*.log"))
    assert all(f"trial {n} (resumed)" in logs for n in interrupted)

    # the report: table, best configuration, a plot per hyperparameter
    assert main(["report", str(folder)]) == 0
    report = capsys.readouterr().out
    best = study.best_trial
    assert f"best: trial {best.number}, top1 {best.value:.4g}" in report
    assert f"{best.number:>5} COMPLETE" in report and (folder / "report.png").stat().st_size > 5000

    # the best trial and each interrupted one, rerun from config.yaml, train exactly as in the sweep
    for n in sorted({best.number, *interrupted}):
        run = folder / f"trial-{n:04d}"
        again = cnntrain.train(recipe=str(run / "config.yaml"), run_dir=str(tmp_path / f"again-{n}"), resume="")
        ours = metrics_rows(run, UNTIMED)
        assert metrics_rows(again.run_dir, UNTIMED)[:len(ours)] == ours, n
        if not (run / "PRUNED").exists():
            wa, wb = weights(run), weights(again.run_dir)
            assert all(torch.equal(wa[k], wb[k]) for k in wa), n


def test_spec_errors_name_the_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"space": {"lr": {"low": 0.01, "high": 0.1}}, "sampler": "grid"}))
    with pytest.raises(ConfigError, match="grid needs a list of values for space.lr"):
        load_spec(path)
    path.write_text(yaml.safe_dump({"space": {"learning_rate": {"low": 0.01, "high": 0.1}}}))
    with pytest.raises(ConfigError, match="'learning_rate' is not a training option"):
        load_spec(path)
    path.write_text(yaml.safe_dump({"space": {"lr": {"low": 0.01, "high": 0.1}}, "budget": 3}))
    with pytest.raises(ConfigError, match="unknown keys budget"):
        load_spec(path)


def test_a_sweep_folder_refuses_a_different_spec(tmp_path):
    from cnntrain.sweep.driver import run_sweep

    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "sweep.yaml").write_text(yaml.safe_dump({**SPEC, "space": {"lr": {"values": [0.1]}}}))
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    with pytest.raises(ConfigError, match="different space"):
        run_sweep(spec_path, sweep_dir=folder)


def test_missing_optuna_is_one_clear_error(monkeypatch):
    from cnntrain.sweep.driver import optuna_module

    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[optuna\]"'):
        optuna_module()


@pytest.mark.parametrize("sampler, pruner", [("random", "hyperband"), ("tpe", "none"), ("grid", "median")])
def test_samplers_and_pruners_come_from_the_spec(tmp_path, sampler, pruner):
    from cnntrain.sweep.driver import open_study

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "sampler": sampler, "pruner": pruner, "storage": ""}))
    study = open_study(load_spec(path), tmp_path)
    assert type(study.sampler).__name__.lower().startswith(sampler)
    assert type(study.pruner).__name__ == {"hyperband": "HyperbandPruner", "none": "NopPruner",
                                           "median": "MedianPruner"}[pruner]
    assert (tmp_path / "study.db").is_file() and study.study_name == "s"


@pytest.mark.parametrize("shared", [False, True], ids=["own-study", "shared-storage"])
def test_a_trial_killed_between_the_ask_and_its_folder_is_adopted_in_its_own_study(tmp_path, shared):
    """A kill right after the study's ask leaves a RUNNING trial with no folder and no lock. In the
    sweep folder's own study.db it can only be this sweep's: the next worker adopts it (otherwise it
    would stay RUNNING for ever and count against --trials). In a shared --storage a trial without a
    folder here may be running on another machine: it is left alone."""
    from cnntrain.sweep.driver import open_study, trial_dir
    from cnntrain.sweep.worker import _take

    spec_path, folder = tmp_path / "tiny.yaml", tmp_path / "sweep"
    folder.mkdir()
    storage = {"storage": f"sqlite:///{tmp_path / 'shared.db'}"} if shared else {}
    spec_path.write_text(yaml.safe_dump({**SPEC, **storage}))
    spec = load_spec(spec_path)
    study = open_study(spec, folder)
    orphan = study.ask()  # killed here: before its folder, its lock or its parameters
    trial, fd, adopted = _take(study, spec, folder)
    os.close(fd)
    if shared:
        assert (trial.number, adopted) == (orphan.number + 1, False)
        assert not trial_dir(folder, orphan.number).exists()
    else:
        assert (trial.number, adopted) == (orphan.number, True)
        assert trial_dir(folder, orphan.number).is_dir()
        assert set(spec.suggest(trial)) == set(SPEC["space"])  # its parameters drawn now
