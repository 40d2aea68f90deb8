"""Data-parallel scaling on one machine: throughput of 1 vs 2 processes (one pinned core each) on
loopback and across two network namespaces joined by a rate-limited veth pair, with the gradient
all-reduce overlapped with backward (DDP) or after it (``--no-overlap``).

    python benchmarks/ddp_scaling.py --quick          # about 1.5 minutes on 2 cores
    python benchmarks/ddp_scaling.py --steps 80 --model resnet20 --json out.json

Prints img/s per setting, the scaling efficiency (2-process img/s / twice the 1-process img/s)
and the overlap gain (overlapped img/s / --no-overlap img/s) per link, all from this one run.
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


def train_args(run_dir: Path, args: argparse.Namespace, world: int, overlap: bool) -> list[str]:
    window = max(args.steps // 4, 1)
    return ["-m", "cnntrain", "train", "--dataset", "synthetic", "--synthetic-shape", "3", "32", "32",
            "--synthetic-size", str(args.batch * world * (args.steps + 1)), "--model", args.model,
            "--batch-size", str(args.batch), "--max-steps", str(args.steps), "--display-every", str(window),
            "--threads", "1", "--progress", "log", "--run-dir", str(run_dir), "--lr", "0.05",
            "--overlap" if overlap else "--no-overlap", "--dist-timeout", "120"]


def measured_rate(run_dir: Path) -> float:
    """Mean img/s of the logged training windows, without the first (warm-up) one."""
    with open(run_dir / "metrics.csv") as f:
        rates = [float(r["img_per_s"]) for r in csv.DictReader(f) if r["split"] == "train"]
    rates = rates[1:] or rates
    return sum(rates) / len(rates)


def rank_env(rank: int, world: int, addr: str, port: int, iface: str | None = None) -> dict:
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": addr, "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    if iface:
        env["GLOO_SOCKET_IFNAME"] = iface  # gloo would otherwise pick the host name's address
    return env


def run_local(run_dir: Path, args, world: int, overlap: bool) -> float:
    """``world`` processes on loopback, rank r pinned to core r."""
    port = free_port()
    procs = [subprocess.Popen(["taskset", "-c", str(r % os.cpu_count()), sys.executable,
                               *train_args(run_dir, args, world, overlap)],
                              cwd=REPO, env=rank_env(r, world, "127.0.0.1", port) if world > 1 else
                              {**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outs = [p.communicate(timeout=args.timeout)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("run failed:\n" + "\n".join(o[-2000:] for o in outs))
    return measured_rate(run_dir)


def run_netns(run_dir: Path, args, rate: str, overlap: bool) -> float:
    """Two nodes in two namespaces, one process each (pinned to cores 0 and 1), link limited to ``rate``."""
    with two_nodes(rate=rate) as net:
        port = free_port()
        procs = [net.popen(i, ["taskset", "-c", str(i % os.cpu_count()), sys.executable,
                               *train_args(run_dir, args, 2, overlap)],
                           env=rank_env(i, 2, net.addrs[0], port, net.ifaces[i]), cwd=REPO) for i in range(2)]
        results = net.wait_all(procs, timeout=args.timeout)
    if any(code for code, _ in results):
        raise RuntimeError("run failed:\n" + "\n".join(t[-2000:] for _, t in results))
    return measured_rate(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, links 1gbit and 100mbit only")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per setting")
    parser.add_argument("--batch", type=int, default=32, help="images per process per step")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--rates", nargs="*", default=["1gbit", "100mbit"], help="tc tbf rates of the veth link")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per setting before giving up")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.steps = min(args.steps, 20)

    rows: list[dict] = []
    started, load_before = time.time(), os.getloadavg()  # other jobs on the machine skew every figure
    with tempfile.TemporaryDirectory() as tmp:
        def record(name: str, link: str, procs: int, overlap: bool, fn) -> None:
            try:
                rate = fn(Path(tmp) / f"r{len(rows)}")
            except NetnsUnavailable as exc:
                print(f"skipped {name}: {exc}", flush=True)
                return
            rows.append({"setting": name, "link": link, "procs": procs, "overlap": overlap, "img_per_s": rate})
            print(f"{name:<34} {rate:8.1f} img/s", flush=True)

        record("1 process", "-", 1, True, lambda d: run_local(d, args, 1, True))
        for overlap in (True, False):
            record(f"2 processes loopback {'overlap' if overlap else 'no-overlap'}", "loopback", 2, overlap,
                   lambda d, o=overlap: run_local(d, args, 2, o))
        for rate in args.rates:
            for overlap in (True, False):
                record(f"2 nodes veth {rate} {'overlap' if overlap else 'no-overlap'}", rate, 2, overlap,
                       lambda d, o=overlap, r=rate: run_netns(d, args, r, o))

    single = next(r["img_per_s"] for r in rows if r["procs"] == 1)
    print(f"\n{args.model}, batch {args.batch}/process, {args.steps} steps, fp32, gloo, threads 1 per process")
    print(f"{'setting':<34} {'img/s':>8} {'scaling eff.':>13} {'overlap gain':>13}")
    for r in rows:
        eff = r["img_per_s"] / (r["procs"] * single)
        partner = next((o for o in rows if o["link"] == r["link"] and o["procs"] == 2 and not o["overlap"]), None)
        gain = (f"{r['img_per_s'] / partner['img_per_s']:.2f}" if r["overlap"] and partner and r["procs"] == 2
                else "")
        r["scaling_efficiency"] = eff
        print(f"{r['setting']:<34} {r['img_per_s']:8.1f} {eff:13.2f} {gain:>13}")
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "load_before": load_before, "seconds": time.time() - started,
            "args": vars(args), "rows": rows}
    print(f"torch {info['torch']}, {info['cpus']} CPUs, load before {load_before[0]:.2f}, {info['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
