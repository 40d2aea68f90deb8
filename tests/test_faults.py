"""Exact resume after a real SIGKILL at several points of a run, one process and two DDP ranks.

The kill comes from a callback (tests/faults/injection.py, given with ``--callbacks``) inside the
training process itself, so it lands at a chosen point (the start of step N, half-way through
writing a checkpoint, between a checkpoint and its manifest) rather than wherever a timer happens
to fire. After ``--resume auto`` (one process)
or the elastic agent's restart (DDP), the final weights, the optimizer state in the last checkpoint
and every metrics.csv row (timings aside) must be bitwise those of a run never interrupted.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

import cnntrain
from cnntrain.engine import checkpoint as ckpt
from tests.helpers import REPO, cli_args, metrics_rows, same_weights, tiny

FAULTS = REPO / "tests" / "faults"
# 256 images / batch 32 = 8 steps per epoch, 16 in all; checkpoints at 3, 6, 9, 12, 15 and 16.
SINGLE = dict(save_every=3, ema_decay=0.9, label_smoothing=0.1, display_every=5)
# Kill points: three random step starts (fixed seed, so a failure reproduces), a kill half-way
# through writing step-9.pt and one after step-12.pt landed but before its manifest.
_steps = random.Random(2026).sample(range(5, 16), 3)  # after the first checkpoint (step 3)
KILLS = [("step", _steps[0], "fp32"), ("step", _steps[1], "bf16"), ("step", _steps[2], "fp16"),
         ("write", 9, "fp32"), ("manifest", 12, "bf16")]


INJECT = ["--callbacks", "injection:FaultInjection"]


def fault_env(kind: str, n: int, marker, rank: int | None = None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CNNTRAIN_FAULT": f"{kind}:{n}", "CNNTRAIN_FAULT_MARKER": str(marker),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(FAULTS), str(REPO), os.environ.get("PYTHONPATH")]))}
    if rank is not None:
        env["CNNTRAIN_FAULT_RANK"] = str(rank)
    return env


def final_optimizer_state(run) -> dict:
    return ckpt.load_checkpoint(ckpt.latest_valid(run / "checkpoints"))["optimizer"]["state"]


def assert_identical_runs(a, b) -> None:
    assert same_weights(a, b), "final weights differ"
    sa, sb = final_optimizer_state(a), final_optimizer_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert all(torch.equal(sa[key][name], sb[key][name]) for name in sa[key]), f"optimizer state {key} differs"
    assert metrics_rows(a) == metrics_rows(b)
    leftovers = [p.name for p in (b / "checkpoints").iterdir() if ".tmp" in p.name]
    assert leftovers == [], f"half-written files left behind: {leftovers}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    return {p: cnntrain.train(tiny(root / p, precision=p, **SINGLE)).run_dir for p in ("fp32", "bf16", "fp16")}


@pytest.mark.slow
@pytest.mark.parametrize("kind,n,precision", KILLS, ids=[f"{k}{n}-{p}" for k, n, p in KILLS])
def test_sigkill_then_resume_auto_is_bitwise_uninterrupted(uninterrupted, tmp_path, kind, n, precision):
    options = tiny(tmp_path / "run", precision=precision, **SINGLE)
    cmd = [sys.executable, "-m", "cnntrain", "train", *cli_args(options), *INJECT]
    marker = tmp_path / "killed"
    first = subprocess.run(cmd, cwd=REPO, env=fault_env(kind, n, marker), capture_output=True, text=True,
                           timeout=120)
    assert first.returncode == -9 and marker.exists(), first.stderr[-2000:]
    assert not (tmp_path / "run" / "model.safetensors").exists()
    if kind == "write":  # the half-written file is there, never renamed into place
        assert [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(f".step-{n:08d}")]
    resumed = subprocess.run([*cmd, "--resume", "auto"], cwd=REPO, env=fault_env(kind, n, marker),
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    assert_identical_runs(uninterrupted[precision], tmp_path / "run")


# Two ranks, batch 16 each on 256 images: 8 steps per epoch, 24 in all, checkpoints every 4 steps.
DDP = dict(batch_size=16, epochs=3, lr=0.05, scale_lr=16, save_every=4, display_every=3)
DDP_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1"}


# Top-k compression keeps each rank's unsent gradient remainder between steps: a resumed run must
# get it back from the checkpoint (one row per rank) to send exactly what it would have.
TOPK = dict(grad_compression="topk", compression_ratio=0.05)
DDP_KILLS = [("step", random.Random(6).randrange(5, 22), 1, {}), ("write", 12, 0, {}),
             ("step", random.Random(7).randrange(5, 22), 1, TOPK)]


@pytest.fixture(scope="module")
def ddp_uninterrupted(tmp_path_factory):
    runs: dict[str, object] = {}

    def reference(extra: dict):
        key = extra.get("grad_compression", "none")
        if key not in runs:
            run = tmp_path_factory.mktemp("ddp") / key
            done = subprocess.run([sys.executable, "-m", "cnntrain", "train", "--nproc-per-node", "2",
                                   *cli_args(tiny(run, **DDP, **extra))], cwd=REPO, env={**os.environ, **DDP_ENV},
                                  capture_output=True, text=True, timeout=150)
            assert done.returncode == 0, done.stderr[-3000:]
            runs[key] = run
        return runs[key]

    return reference


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("kind,n,rank,extra", DDP_KILLS,
                         ids=["worker-mid-step", "rank0-mid-checkpoint-write", "topk-worker-mid-step"])
def test_ddp_sigkill_then_elastic_restart_is_bitwise_uninterrupted(ddp_uninterrupted, tmp_path, kind, n, rank, extra):
    reference = ddp_uninterrupted(extra)
    run = tmp_path / "run"
    marker = tmp_path / "killed"
    out = subprocess.run([sys.executable, "-m", "cnntrain", "train", "--nproc-per-node", "2", "--max-restarts", "1",
                          *cli_args(tiny(run, **DDP, **extra)), *INJECT], cwd=REPO,
                         env={**fault_env(kind, n, marker, rank), **DDP_ENV}, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert marker.exists(), "the fault never fired"
    assert "resumed from" in out.stderr, out.stderr[-3000:]
    assert_identical_runs(reference, run)
    if extra:
        saved = ckpt.load_checkpoint(ckpt.latest_valid(run / "checkpoints"))["strategy"]["remainders"]
        assert saved.shape[0] == 2 and not torch.equal(saved[0], saved[1])  # each rank's own


@pytest.mark.dist
def test_ddp_save_interval_is_agreed_by_every_rank(tmp_path):
    """--save-interval on two ranks: rank 0's clock decides at each log line, so both ranks enter the
    checkpoint's collectives together (no hang) and the checkpoints fall on log-line steps."""
    run = tmp_path / "run"
    options = tiny(run, **{**DDP, "save_every": 1000, "save_interval": 1e-6, "keep_last": 100, "dist_timeout": 30})
    out = subprocess.run([sys.executable, "-m", "cnntrain", "train", "--nproc-per-node", "2", *cli_args(options)],
                         cwd=REPO, env={**os.environ, **DDP_ENV}, capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")]
    # Log lines every 3 steps and at each epoch end (8, 16, 24); a save is due at every one of them.
    assert steps == [3, 6, 8, 9, 12, 15, 16, 18, 21, 24], steps
