"""Data-parallel scaling on one machine: throughput of 1 vs 2 processes (one pinned core each) on
loopback and across two network namespaces joined by a rate-limited veth pair, with the gradient
all-reduce overlapped with backward (DDP) or after it (``--no-overlap``), or with a sparsified or
partial exchange (``--modes``).

    python benchmarks/ddp_scaling.py --quick          # about 1.5 minutes on 2 cores
    python benchmarks/ddp_scaling.py --steps 80 --model resnet20 --json out.json
    python benchmarks/ddp_scaling.py --quick --modes overlap topk threshold partial --rates 100mbit
    python benchmarks/ddp_scaling.py --tiny --rates   # 4 steps of batch 8, loopback only: checks that it runs

Prints img/s per setting, the scaling efficiency (2-process img/s / twice the 1-process img/s),
the overlap gain (overlapped img/s / --no-overlap img/s) per link, and the bytes per step each
rank sent against a dense fp32 exchange (from the run's summary.json), all from this one run.
The namespace rows need root and iproute2; without them they are skipped with the reason.
Throughput is the mean of cnntrain's own per-window img/s after the first (warm-up) window.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.netns import NetnsUnavailable, two_nodes  # noqa: E402 - needs the path above


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mode_flags(mode: str, args: argparse.Namespace) -> list[str]:
    """The ``cnntrain train`` flags of an exchange mode (see ``--modes``)."""
    return {
        "overlap": ["--overlap"],
        "no-overlap": ["--no-overlap"],
        "fp16": ["--grad-compression", "fp16"],
        "topk": ["--grad-compression", "topk", "--compression-ratio", str(args.ratio)],
        "threshold": ["--grad-compression", "threshold", "--compression-threshold", str(args.threshold)],
        "partial": ["--partial-update", "--compression-ratio", str(args.ratio)],
    }[mode]


MODES = ("overlap", "no-overlap", "fp16", "topk", "threshold", "partial")


def train_args(run_dir: Path, args: argparse.Namespace, world: int, mode: str) -> list[str]:
    window = max(args.steps // 4, 1)
    return ["-m", "cnntrain", "train", "--dataset", "synthetic", "--synthetic-shape", "3", "32", "32",
            "--synthetic-size", str(args.batch * world * (args.steps + 1)), "--model", args.model,
            "--batch-size", str(args.batch), "--max-steps", str(args.steps), "--display-every", str(window),
            "--threads", "1", "--progress", "log", "--run-dir", str(run_dir), "--lr", "0.05",
            *mode_flags(mode, args), "--dist-timeout", "120"]


def measured(run_dir: Path) -> dict:
    """Mean img/s of the logged training windows, without the first (warm-up) one, and the bytes
    per step sent and a dense exchange's (absent for 1 process and PowerSGD)."""
    with open(run_dir / "metrics.csv") as f:
        rates = [float(r["img_per_s"]) for r in csv.DictReader(f) if r["split"] == "train"]
    rates = rates[1:] or rates
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"img_per_s": sum(rates) / len(rates), "bytes_per_step": summary.get("comm_bytes_per_step"),
            "dense_bytes_per_step": summary.get("dense_bytes_per_step"), "final_top1": summary.get("final_top1")}


def rank_env(rank: int, world: int, addr: str, port: int, iface: str | None = None) -> dict:
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": addr, "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    if iface:
        env["GLOO_SOCKET_IFNAME"] = iface  # gloo would otherwise pick the host name's address
    return env


def run_local(run_dir: Path, args, world: int, mode: str) -> dict:
    """``world`` processes on loopback, rank r pinned to core r."""
    port = free_port()
    procs = [subprocess.Popen(["taskset", "-c", str(r % os.cpu_count()), sys.executable,
                               *train_args(run_dir, args, world, mode)],
                              cwd=REPO, env=rank_env(r, world, "127.0.0.1", port) if world > 1 else
                              {**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outs = [p.communicate(timeout=args.timeout)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("run failed:\n" + "\n".join(o[-2000:] for o in outs))
    return measured(run_dir)


def run_netns(run_dir: Path, args, rate: str, mode: str) -> dict:
    """Two nodes in two namespaces, one process each (pinned to cores 0 and 1), link limited to ``rate``."""
    with two_nodes(rate=rate) as net:
        port = free_port()
        procs = [net.popen(i, ["taskset", "-c", str(i % os.cpu_count()), sys.executable,
                               *train_args(run_dir, args, 2, mode)],
                           env=rank_env(i, 2, net.addrs[0], port, net.ifaces[i]), cwd=REPO) for i in range(2)]
        results = net.wait_all(procs, timeout=args.timeout)
    if any(code for code, _ in results):
        raise RuntimeError("run failed:\n" + "\n".join(t[-2000:] for _, t in results))
    return measured(run_dir)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, links 1gbit and 100mbit only")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per setting")
    parser.add_argument("--batch", type=int, default=32, help="images per process per step")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--rates", nargs="*", default=["1gbit", "100mbit"], help="tc tbf rates of the veth link")
    parser.add_argument("--modes", nargs="+", default=["overlap", "no-overlap"], choices=MODES,
                        help="exchange modes run with 2 processes on each link")
    parser.add_argument("--ratio", type=float, default=0.05, help="topk / partial: --compression-ratio")
    parser.add_argument("--threshold", type=float, default=0.01, help="threshold: --compression-threshold")
    parser.add_argument("--no-loopback", dest="loopback", action="store_false", help="skip the loopback rows")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per setting before giving up")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--tiny", action="store_true", help="4 steps of batch 8 per setting")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 20)
    if args.tiny:
        args.steps, args.batch = 4, 8

    rows: list[dict] = []
    started, load_before = time.time(), os.getloadavg()  # other jobs on the machine skew every figure
    with tempfile.TemporaryDirectory() as tmp:
        def record(name: str, link: str, procs: int, mode: str, fn) -> None:
            try:
                result = fn(Path(tmp) / f"r{len(rows)}")
            except NetnsUnavailable as exc:
                print(f"skipped {name}: {exc}", flush=True)
                return
            rows.append({"setting": name, "link": link, "procs": procs, "mode": mode, **result})
            print(f"{name:<34} {result['img_per_s']:8.1f} img/s", flush=True)

        record("1 process", "-", 1, "-", lambda d: run_local(d, args, 1, "overlap"))
        for mode in args.modes if args.loopback else ():
            record(f"2 processes loopback {mode}", "loopback", 2, mode, lambda d, m=mode: run_local(d, args, 2, m))
        for rate in args.rates:
            for mode in args.modes:
                record(f"2 nodes veth {rate} {mode}", rate, 2, mode,
                       lambda d, m=mode, r=rate: run_netns(d, args, r, m))

    single = next(r["img_per_s"] for r in rows if r["procs"] == 1)
    print(f"\n{args.model}, batch {args.batch}/process, {args.steps} steps, fp32, gloo, threads 1 per process")
    print(f"{'setting':<34} {'img/s':>8} {'scaling eff.':>13} {'overlap gain':>13} {'kB/step sent':>13} "
          f"{'vs dense':>9}")
    for r in rows:
        eff = r["img_per_s"] / (r["procs"] * single)
        partner = next((o for o in rows if o["link"] == r["link"] and o["mode"] == "no-overlap"), None)
        gain = f"{r['img_per_s'] / partner['img_per_s']:.2f}" if r["mode"] == "overlap" and partner else ""
        sent = f"{r['bytes_per_step'] / 1e3:.1f}" if r["bytes_per_step"] else ""
        less = f"{r['dense_bytes_per_step'] / r['bytes_per_step']:.1f}x" if r["bytes_per_step"] else ""
        r["scaling_efficiency"] = eff
        print(f"{r['setting']:<34} {r['img_per_s']:8.1f} {eff:13.2f} {gain:>13} {sent:>13} {less:>9}")
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "load_before": load_before, "seconds": time.time() - started,
            "args": vars(args), "rows": rows}
    print(f"torch {info['torch']}, {info['cpus']} CPUs, load before {load_before[0]:.2f}, {info['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    return info


if __name__ == "__main__":
    main()
