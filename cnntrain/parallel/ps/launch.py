"""``cnntrain train --strategy async-ps --ps 2 --workers 3 --evaluator``: every role on this machine.

Starts the ps, the chief, the other workers and (with ``--evaluator``) an evaluator as child
processes, each ``python -m cnntrain train --config <this job's resolved config> --role ...``, on
free loopback ports (or ``--dist-start-port``). Their log lines come to this terminal, prefixed
with their role. Every child gets the job's ps token in ``$CNNTRAIN_PS_TOKEN`` (the one given, else
a fresh random one), never on a command line (``ps`` shows those to every user) nor in a file.
Then it watches them:

- a worker or the evaluator that fails is reported, and the others go on;
- a ps or the chief that fails ends the job: the others learn it from the ps and stop by
  themselves, and whatever still runs ``--dist-timeout`` later is stopped here; the job fails;
- after the chief finishes, the others exit by themselves (stragglers are stopped the same way).

On exit, ctrl-C, SIGTERM or an error here every child still running is terminated (SIGTERM, then
SIGKILL after 5 s); on Linux the children also get SIGTERM should this process be killed outright.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cnntrain.config import TrainConfig, save_config
from cnntrain.engine.run import Result, resolve_run_dir
from cnntrain.errors import ConfigError, DistributedError
from cnntrain.hardware import usable_cores
from cnntrain.parallel.ps import protocol as P
from cnntrain.parallel.ps.client import JOB_STARTED_ENV

log = logging.getLogger("cnntrain")
STOP_GRACE_S = 5.0


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free on ``host`` right now (all held open while choosing)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the launcher dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))
    except (OSError, AttributeError):
        pass


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Child:
    def __init__(self, name: str, kind: str, argv: list[str], env: dict) -> None:
        self.name, self.kind = name, kind
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        self.proc = subprocess.Popen(argv, env=env, preexec_fn=preexec)  # the launcher has no threads
        self.code: int | None = None

    def poll(self) -> int | None:
        if self.code is None:
            self.code = self.proc.poll()
        return self.code


def job_config(cfg: TrainConfig) -> tuple[TrainConfig, int, int]:
    """The config every child gets (cluster spelled out, run folder fixed), and the (ps, worker) counts."""
    num_ps = len([e for e in cfg.ps_hosts.split(",") if e.strip()]) if cfg.ps_hosts else cfg.ps_count
    num_workers = len([e for e in cfg.worker_hosts.split(",") if e.strip()]) if cfg.worker_hosts else cfg.worker_count
    if num_ps < 1 or num_workers < 1:
        raise ConfigError("--strategy async-ps without --role starts every role on this machine: give --ps N and "
                          "--workers N (the chief counts as a worker), or start each role with --role")
    if cfg.ps_hosts:
        ps_hosts = cfg.ps_hosts
    else:
        ports = ([cfg.dist_start_port + i for i in range(num_ps)] if cfg.dist_start_port else free_ports(num_ps))
        ps_hosts = ",".join(f"127.0.0.1:{p}" for p in ports)
    worker_hosts = cfg.worker_hosts or ",".join(["127.0.0.1"] * num_workers)
    run_dir = str(resolve_run_dir(cfg, int(time.time())))
    child = cfg.replace(ps_hosts=ps_hosts, worker_hosts=worker_hosts, ps_count=0, worker_count=0, dist_start_port=0,
                        evaluator=False, run_dir=run_dir)
    return child, num_ps, num_workers


def launch_local(cfg: TrainConfig, setup_logging=None) -> Path:
    """Run the whole job here; returns the run folder, or raises DistributedError when it failed.
    ``setup_logging`` is called once the options have been checked."""
    child_cfg, num_ps, num_workers = job_config(cfg)
    if setup_logging is not None:
        setup_logging()
    trainers = num_workers
    cores = usable_cores()
    train_threads = cfg.threads or max(1, cores // trainers)
    token = P.job_token(cfg)
    log.info("async-ps on this machine: %d ps at %s, the chief + %d worker(s)%s; run folder %s; links prove %s",
             num_ps, child_cfg.ps_hosts, num_workers - 1, " + an evaluator" if cfg.evaluator else "",
             child_cfg.run_dir, "the ps token given" if token else "a fresh random ps token")
    token = token or secrets.token_hex(32)
    children: list[_Child] = []
    previous = _on_sigterm_raise()
    with tempfile.TemporaryDirectory(prefix="cnntrain-async-ps-") as tmp:
        recipe = Path(tmp) / "job.yaml"
        save_config(child_cfg, recipe)
        base = [sys.executable, "-m", "cnntrain", "train", "--config", str(recipe), "--run-dir", child_cfg.run_dir]

        started = str(time.time())

        def start(name: str, kind: str, extra: list[str], threads: int) -> None:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", JOB_STARTED_ENV: started,
                   P.TOKEN_ENV: token}
            children.append(_Child(name, kind, [*base, *extra, "--threads", str(threads)], env))

        try:
            for i in range(num_ps):
                start(f"ps {i}", "ps", ["--role", "ps", "--ps-index", str(i)], cfg.threads or 1)
            start("the chief", "chief", ["--role", "chief"], train_threads)
            for i in range(1, num_workers):
                start(f"worker {i}", "worker", ["--role", "worker", "--worker-index", str(i)], train_threads)
            if cfg.evaluator:
                start("the evaluator", "evaluator", ["--role", "evaluator"], cfg.threads or 1)
            _supervise(children, cfg.dist_timeout)
        finally:
            _stop(children)
            _restore_sigterm(previous)
    return Path(child_cfg.run_dir)


def _supervise(children: list[_Child], timeout: float) -> None:
    """Wait for the job; raise DistributedError naming the ps or chief that failed."""
    reported: set[str] = set()
    fatal: _Child | None = None
    ended_at: float | None = None
    while True:
        running = [c for c in children if c.poll() is None]
        for c in children:
            if c.code is None or c.name in reported:
                continue
            reported.add(c.name)
            if c.code == 0:
                log.info("launcher: %s exited", c.name)
                if c.kind == "chief":
                    ended_at = ended_at or time.monotonic()
                continue
            if c.kind in ("ps", "chief") and fatal is None:
                log.error("launcher: %s failed (%s); the job ends", c.name, _describe_exit(c.code))
                fatal = c
                ended_at = ended_at or time.monotonic()
            elif fatal is None:
                log.warning("launcher: %s stopped (%s); the others go on", c.name, _describe_exit(c.code))
            else:
                log.info("launcher: %s stopped (%s)", c.name, _describe_exit(c.code))
        if not running:
            break
        if ended_at is not None and time.monotonic() - ended_at > timeout + 30:
            log.warning("launcher: still running %.0f s after the end, stopped: %s", timeout + 30,
                        ", ".join(c.name for c in running))
            break
        time.sleep(0.1)
    if fatal is not None:
        raise DistributedError(f"async-ps job failed: {fatal.name} stopped ({_describe_exit(fatal.code)}); its error "
                               f"is printed above")
    chief = next(c for c in children if c.kind == "chief")
    if chief.code != 0:
        raise DistributedError("async-ps job failed: the chief did not finish")


def _stop(children: list[_Child]) -> None:
    alive = [c for c in children if c.poll() is None]
    for c in alive:
        c.proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for c in alive:
        try:
            c.proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait()


def _on_sigterm_raise():
    """SIGTERM here becomes SystemExit, so the children are stopped too (main thread only)."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        return None


def _restore_sigterm(previous) -> None:
    if previous is not None:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, previous)


def read_result(run_dir: Path):
    """The chief's Result, from the run folder's summary.json."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return Result(run_dir, summary["best_top1"], summary["final_top1"] or 0.0, summary["steps"],
                  summary["train_seconds"], summary["img_per_s"], summary)
