"""--early-stop and --lr-schedule plateau: when they act, the weights kept, exact resume."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import cnntrain
from cnntrain.engine import checkpoint as ckpt
from cnntrain.engine.early_stop import EarlyStopping, PlateauSchedule
from cnntrain.engine.evaluate import EvalResult
from cnntrain.errors import ConfigError
from tests.helpers import metrics_rows, same_weights, tiny, weights


class FakeLoop:
    """What the callbacks read of a TrainLoop: the step, the evaluated model, request_stop."""

    def __init__(self) -> None:
        self.state = SimpleNamespace(step=0)
        self.eval_model = nn.Linear(2, 2)
        self.stop_reason = None
        self.is_main, self.base_lr, self.lr_factor = True, 0.1, 1.0

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason


def _result(loss: float) -> EvalResult:
    return EvalResult(loss=loss, top1=0.5, top5=1.0, count=4, class_correct=[1, 1], class_total=[2, 2])


def test_early_stopping_stops_after_patience_evaluations_and_keeps_the_best_weights():
    loop, stopper = FakeLoop(), EarlyStopping(patience=2, metric="loss", min_delta=0.05)
    kept = None
    # improvements: 1.0 (first), 0.8; 0.77 is within min_delta, 0.9 worse: the 2nd miss stops
    for step, loss in enumerate([1.0, 0.8, 0.77, 0.9, 0.5], start=1):
        loop.state.step = step
        with torch.no_grad():
            loop.eval_model.weight.fill_(step)
        stopper.on_eval_end(loop, _result(loss))
        if step == 2:
            kept = {k: v.clone() for k, v in loop.eval_model.state_dict().items()}
        if loop.stop_reason:
            break
    assert step == 4 and "loss" in loop.stop_reason and "step 2" in loop.stop_reason
    summary = {}
    stopper.on_train_end(loop, summary)
    assert torch.equal(loop.eval_model.weight, kept["weight"])
    assert summary["best_weights"] == {"metric": "loss", "value": 0.8, "step": 2, "early_stopped": True}


def test_plateau_lowers_the_lr_after_patience_and_not_below_lr_final():
    loop, plateau = FakeLoop(), PlateauSchedule(patience=1, factor=0.1, metric="loss", min_factor=0.005)
    factors = []
    for step, loss in enumerate([1.0, 1.0, 1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], start=1):
        loop.state.step = step
        plateau.on_eval_end(loop, _result(loss))
        factors.append(loop.lr_factor)
    # more than one miss in a row: x0.1 at the 2nd miss; the count restarts; floor at 0.005
    assert factors == pytest.approx([1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.005, 0.005])


def test_early_stopping_in_a_run_stops_at_the_right_epoch_and_exports_the_best_weights(tmp_path):
    options = tiny(tmp_path / "run", epochs=8, early_stop=2, early_stop_metric="loss", lr=0.3, keep_last=20,
                   lr_schedule="constant")
    result = cnntrain.train(options)
    with open(result.run_dir / "metrics.csv") as f:
        losses = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f) if r["split"] == "test"]
    best, misses, expected_stop = None, 0, None
    for step, loss in losses:  # what the rule says, from the logged evaluations
        if best is None or loss < best[1]:
            best, misses = (step, loss), 0
        else:
            misses += 1
            if misses == 2:
                expected_stop = step
                break
    assert expected_stop is not None, f"no plateau in this run to test against: {losses}"
    assert result.steps == expected_stop == losses[-1][0] and result.summary["stopped"].startswith("early stopping")
    assert result.summary["best_weights"]["step"] == best[0]
    saved = torch.load(result.run_dir / "checkpoints" / f"step-{best[0]:08d}.pt", weights_only=True)["model"]
    exported = weights(result.run_dir)
    assert all(torch.equal(saved[k], exported[k]) for k in exported)
    last = torch.load(ckpt.latest_valid(result.run_dir / "checkpoints"), weights_only=True)["model"]
    assert not all(torch.equal(last[k], exported[k]) for k in exported)  # not simply the last weights


class Crash(Exception):
    pass


class CrashAfterCheckpoint(cnntrain.Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_checkpoint(self, loop, path) -> None:
        if loop.state.step == self.at_step:
            raise Crash


def test_plateau_and_early_stopping_resume_bitwise_exactly(tmp_path):
    options = dict(epochs=5, eval_every=4, save_every=3, lr=0.3, lr_schedule="plateau", plateau_patience=0,
                   early_stop=3, early_stop_metric="top1", balanced_sampler=True, class_weights="auto")
    full = cnntrain.train(tiny(tmp_path / "full", **options))
    part = tiny(tmp_path / "part", **options)
    with pytest.raises(Crash):
        cnntrain.train(part, callbacks=[CrashAfterCheckpoint(15)])  # after the plateau has acted
    resumed = cnntrain.train({**part, "resume": "auto"})

    lrs = sorted({float(r["lr"]) for r in metrics_rows(full.run_dir)})
    assert len(lrs) >= 2, "the plateau schedule never lowered the LR: nothing resumed to test"
    assert metrics_rows(full.run_dir) == metrics_rows(resumed.run_dir)
    assert same_weights(full.run_dir, resumed.run_dir)
    for key in ("steps", "stopped", "best_weights", "macro_f1"):
        assert full.summary[key] == resumed.summary[key]


def test_early_stopping_and_plateau_need_a_validation_split_and_refuse_async_ps():
    loop = FakeLoop()
    loop.val_loader, loop.cfg = None, SimpleNamespace(dataset="folder")
    with pytest.raises(ConfigError, match="--early-stop watches a validation metric.*--val-split"):
        EarlyStopping(1).on_train_start(loop)
    with pytest.raises(ConfigError, match="--lr-schedule plateau watches"):
        PlateauSchedule(1, 0.1).on_train_start(loop)
    for options in ({"lr_schedule": "plateau"}, {"early_stop": 2}):
        with pytest.raises(ConfigError, match="not supported with --strategy async-ps"):
            cnntrain.build_config(strategy="async-ps", ps_count=1, worker_count=1, **options)
