"""Real multi-process jobs on loopback with gloo: every launcher, equivalence, shards, faults,
elastic restarts and two "nodes" in network namespaces. Each job is tiny and has a timeout."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cnntrain
from tests.helpers import REPO, cli_args, run_cli, tiny, weights
from tests.netns import NetnsUnavailable, two_nodes

pytestmark = pytest.mark.dist

# PYTHONFAULTHANDLER: a rank that dies of a signal prints where it was.
ENV = {"PYTHONUNBUFFERED": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONFAULTHANDLER": "1"}
# Per process batch 16 on 256 images: 8 steps per epoch of global batch 32.
DDP = dict(batch_size=16, epochs=3, lr=0.05, scale_lr=16, progress="log")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (to prove no worker outlived its job)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def rank_env(rank: int, world: int, port: int, addr: str = "127.0.0.1", **extra) -> dict:
    return {**os.environ, **ENV, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": addr, "MASTER_PORT": str(port), **extra}


def start_ranks(options: dict, world: int = 2) -> list[subprocess.Popen]:
    """One ``cnntrain train`` per rank, launched by hand through the torchrun environment variables."""
    port = free_port()
    return [subprocess.Popen([sys.executable, "-m", "cnntrain", "train", *cli_args(options)], cwd=REPO,
                             env=rank_env(r, world, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for r in range(world)]


def assert_same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """The reference: ``cnntrain train --nproc-per-node 2`` (DDP, overlapped all-reduce)."""
    root = tmp_path_factory.mktemp("ddp")
    started = time.monotonic()
    out = run_cli("train", "--nproc-per-node", "2", *cli_args(tiny(root / "run", **DDP)), timeout=120, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    return root, out, time.monotonic() - started


def test_nproc_per_node_matches_one_process_with_the_same_global_batch(ddp_run, tmp_path):
    root, out, _ = ddp_run
    run = root / "run"
    # One run folder, one metrics.csv with each step logged once (rank 0 only writes).
    assert [p.name for p in root.iterdir()] == ["run"]
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train_steps = [r["step"] for r in rows if r["split"] == "train"]
    assert len(train_steps) == len(set(train_steps)) and len(train_steps) >= 4
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 32 and summary["eval_images"] == 64
    # --scale-lr 16: lr 0.05 x 32 / 16 = 0.1, and the start line says so.
    assert "batch 16 x 2 = 32, lr 0.1," in out.stderr
    # The same global batch in one process reaches the same accuracy within noise (64 test images).
    single = cnntrain.train(tiny(tmp_path / "one", **{**DDP, "batch_size": 32}))
    assert abs(single.final_top1 - summary["final_top1"]) <= 0.1, (single.final_top1, summary["final_top1"])
    assert summary["final_top1"] > 0.5
    # No worker outlived the job.
    assert processes_mentioning(str(run)) == []


def test_torchrun_standalone_with_no_overlap_equals_ddp(ddp_run, tmp_path):
    """``--no-overlap`` (broadcast + one coalesced all-reduce after backward) under plain torchrun
    gives DDP's weights: two-term sums are exact, so bitwise on CPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "cnntrain", "train", *cli_args(tiny(tmp_path / "run", **DDP, overlap=False))]
    out = subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_weights(tmp_path / "run", ddp_run[0] / "run")


def test_mpirun_launch_equals_torchrun(ddp_run, tmp_path):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun not installed (apt-get install openmpi-bin; .ci/run does it)")
    root = ["--allow-run-as-root", "--oversubscribe"] if os.geteuid() == 0 else []
    # mpirun binds each rank to one core; --threads 1 (in tiny) keeps torch from guessing.
    cmd = [mpirun, "-n", "2", *root, "--bind-to", "none", sys.executable, "-m", "cnntrain", "train",
           *cli_args(tiny(tmp_path / "run", **DDP)), "--master-port", str(free_port())]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    out = subprocess.run(cmd, cwd=REPO, env={**env, **ENV}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "(openmpi)" not in out.stderr  # no rendezvous error
    assert_same_weights(tmp_path / "run", ddp_run[0] / "run")


def test_shards_are_disjoint_and_compressed_gradients_keep_ranks_equal(tmp_path):
    """In a real 2-process group: every training image is visited exactly once per epoch across
    ranks; fp16 / bf16 / PowerSGD (forced to one bucket) / --no-overlap keep the ranks' weights
    identical and close to uncompressed training; --precision auto is rank 0's choice on every rank."""
    port, report = free_port(), tmp_path / "report.json"
    procs = [subprocess.Popen([sys.executable, "-m", "tests.dist_tasks", str(report)], cwd=REPO,
                              env=rank_env(r, 2, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    result = json.loads(report.read_text())
    for key, seen in result["shards"].items():
        assert seen["min"] == seen["max"] == 1, key
    comp = result["compression"]
    assert all(c["ranks_equal"] for c in comp.values()), comp
    assert comp["none"]["buckets"] > 1 and comp["powersgd"]["buckets"] == 1  # bucket_mb 0.01 forced to one
    assert comp["none-no-overlap"]["rel_diff_to_none"] == 0.0
    assert comp["fp16"]["rel_diff_to_none"] < 1e-3 and comp["bf16"]["rel_diff_to_none"] < 1e-2
    assert 0 < comp["powersgd"]["rel_diff_to_none"] < 0.1
    # --precision auto: a rank whose own probe reads bf16 as slow still takes rank 0's bf16, and a
    # choice refused (--loss-scale without fp16) fails on both ranks instead of one waiting on the other.
    assert result["precision"] == {"precisions": ["bf16", "bf16"], "refused_on_ranks": 2}


def test_a_peer_that_never_joins_ends_the_job_within_the_timeout(tmp_path):
    port = free_port()
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "cnntrain", "train", *cli_args(tiny(tmp_path / "run", dist_timeout=3))],
                         cwd=REPO, env=rank_env(0, 2, port), capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert out.returncode == 1
    err = out.stderr.strip().splitlines()[-1]
    assert err.startswith("cnntrain: error: rank 0 of 2") and f"127.0.0.1:{port}" in err and "3 s" in err, err
    assert took < 30


def test_a_peer_killed_mid_training_ends_the_survivor_with_the_operation(tmp_path):
    run = tmp_path / "run"
    procs = start_ranks(tiny(run, **{**DDP, "epochs": 40, "save_every": 2, "dist_timeout": 20}))
    try:
        deadline = time.monotonic() + 60
        while not list((run / "checkpoints").glob("step-*.pt")):
            assert time.monotonic() < deadline and procs[0].poll() is None, "training never started"
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGKILL)
        started = time.monotonic()
        text, _ = procs[0].communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 1, text[-2000:]
    err = [ln for ln in text.splitlines() if ln.startswith("cnntrain: error:")]
    assert err and "rank 0 of 2:" in err[0] and "failed" in err[0], text[-2000:]
    assert any(op in err[0] for op in ("DDP forward/backward", "all-reduce", "broadcast", "barrier")), err[0]
    assert took < 20
    assert processes_mentioning(str(run)) == []


def test_sigkilled_worker_restarts_and_ends_equal_to_an_uninterrupted_run(tmp_path):
    """``--max-restarts 1``: SIGKILL one worker mid-epoch; the elastic agent restarts both, they
    resume from the newest checkpoint, and the final weights equal an uninterrupted run's."""
    options = {**DDP, "synthetic_shape": [3, 32, 32], "model": "resnet20", "epochs": 2, "save_every": 2}
    done = run_cli("train", "--nproc-per-node", "2", *cli_args(tiny(tmp_path / "full", **options)),
                   timeout=150, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]

    run = tmp_path / "killed"
    args = ["train", "--nproc-per-node", "2", "--max-restarts", "1", *cli_args(tiny(run, **options))]
    agent = subprocess.Popen([sys.executable, "-m", "cnntrain", *args], cwd=REPO, env={**os.environ, **ENV},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while not list((run / "checkpoints").glob("step-*.pt")):
            assert time.monotonic() < deadline and agent.poll() is None, "no checkpoint before the end"
            time.sleep(0.02)
        workers = children_of(agent.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        text, _ = agent.communicate(timeout=150)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, text[-3000:]
    assert "resuming from" in text and "resumed from" in text, text[-3000:]
    assert_same_weights(run, tmp_path / "full")
    assert processes_mentioning(str(run)) == []


def test_two_nodes_in_network_namespaces(ddp_run, tmp_path):
    """A 2-node job (one process per node) across a veth pair, gloo on that interface only."""
    options = tiny(tmp_path / "run", **DDP)
    try:
        with two_nodes() as net:
            port = free_port()
            procs = [net.popen(i, [sys.executable, "-m", "cnntrain", "train", *cli_args(options)],
                               env=rank_env(i, 2, port, addr=net.addrs[0], GLOO_SOCKET_IFNAME=net.ifaces[i]),
                               cwd=REPO) for i in range(2)]
            results = net.wait_all(procs, timeout=120)
    except NetnsUnavailable as exc:
        pytest.skip(f"no network namespaces: {exc}")
    assert all(code == 0 for code, _ in results), [t[-2000:] for _, t in results]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in net.names), "namespaces left behind"
    assert_same_weights(tmp_path / "run", ddp_run[0] / "run")


def test_failed_workers_end_the_launcher_with_one_error_line(tmp_path):
    """A worker that stops with an error (here: global batch larger than the data) ends
    ``--nproc-per-node`` with a DistributedError naming the failed ranks, and no worker survives."""
    out = run_cli("train", "--nproc-per-node", "2", *cli_args(tiny(tmp_path / "run", synthetic_size=24)),
                  timeout=120, env=ENV)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("cnntrain: error: worker processes failed") and "local rank" in last, last
    assert "lower --batch-size" in out.stderr  # the worker's own reason is shown above it
    assert processes_mentioning(str(tmp_path / "run")) == []


def test_eval_on_two_processes_gives_exactly_the_single_process_top1(ddp_run):
    """A checkpoint trained on 2 processes, scored by ``cnntrain eval`` on 1 and on 2 processes:
    every image is scored once either way, so the counts and top-1 are identical; the report is
    printed once (both ranks printing it interleaved their lines)."""
    run = ddp_run[0] / "run"
    one = run_cli("eval", "--checkpoint", str(run), timeout=120, env=ENV)
    assert one.returncode == 0, one.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "cnntrain", "eval", "--checkpoint", str(run)]
    two = subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]
    score = [ln for ln in one.stdout.splitlines() if ln.startswith("top-1")][0]
    assert "(64 images)" in one.stdout and "(64 images)" in two.stdout
    assert score in two.stdout.splitlines()
    assert two.stdout.count("top-1") == 1  # rank 0 reports; rank 1 only scores its half


def test_a_port_already_in_use_is_named_within_the_timeout(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "cnntrain", "train",
                              *cli_args(tiny(tmp_path / "run", max_steps=2, dist_timeout=5))],
                             cwd=REPO, env=rank_env(0, 2, port), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert f"port {port}" in out.stderr and "already in use" in out.stderr and "--master-port" in out.stderr
    assert "Traceback" not in out.stderr
    assert time.monotonic() - started < 30


def test_gradient_accumulation_under_ddp_matches_one_process_with_the_whole_batch(tmp_path):
    """2 ranks x batch 8 x 2 accumulated micro-batches = one process with batch 32: the same images
    per step and the same mean gradient, so the same weights up to float rounding (no augmentation:
    its random draws are per micro-batch)."""
    options = dict(DDP, augment="none", scale_lr=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "cnntrain",
           "train", *cli_args(tiny(tmp_path / "ddp", **{**options, "batch_size": 8, "accum_steps": 2}))]
    out = subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "batch 8 x 2 x 2 accumulated = 32," in out.stderr and "8 steps/epoch" in out.stderr
    single = cnntrain.train(tiny(tmp_path / "one", **{**options, "batch_size": 32}))
    wa, wb = weights(tmp_path / "ddp"), weights(single.run_dir)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4) for k in wa)
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["global_batch"] == 32
