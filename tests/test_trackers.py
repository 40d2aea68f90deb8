"""MLflow and Weights & Biases trackers: what reaches them, and a killed run resumed into the same tracker run.

Against a real MLflow tracking server on 127.0.0.1 (started here, one per module) and MLflow's file
store, and W&B in offline mode, whose run files are read back record by record. A run killed with
SIGKILL and resumed with ``--resume auto`` must leave ONE tracker run whose metric history equals
that of an uninterrupted run: no step sent twice, none missing.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import cnntrain
from cnntrain.cli import build_parser
from cnntrain.engine import checkpoint as ckpt
from cnntrain.engine import trackers
from cnntrain.errors import ConfigError
from tests.helpers import REPO, cli_args, tiny

mlflow = pytest.importorskip("mlflow")
FAULTS = REPO / "tests" / "faults"
# Columns that do not depend on timing: an uninterrupted and a resumed run agree on them exactly.
STABLE = ("loss", "top1_err", "top5_err", "lr", "grad_norm", "epoch", "loss_scale")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with a SQLite backend and proxied artifacts; always stopped."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art")]
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _kill_at(options: dict, fault: str, env: dict | None = None) -> None:
    """Run ``options`` in a new process that SIGKILLs itself at ``fault`` (tests/faults/injection.py)."""
    cmd = [sys.executable, "-m", "cnntrain", "train", *cli_args(options), "--callbacks", "injection:FaultInjection"]
    # its own wandb-core service, as a process started anew has (not this one's, which outlives the kill)
    inherited = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    full_env = {**inherited, **(env or {}), "CNNTRAIN_FAULT": fault,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(FAULTS), str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=180)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert not (Path(options["run_dir"]) / "model.safetensors").exists()


def _history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every stable metric's full history (duplicates would show as repeated steps)."""
    keys = [k for k in client.get_run(run_id).data.metrics if k.split("/", 1)[1] in STABLE]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def _mlflow_run(client, run_dir: Path):
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.run_dir = '{run_dir}'")
    assert len(runs) == 1, f"{len(runs)} MLflow runs for {run_dir}"
    return runs[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("store", ["server", "file"])
def test_mlflow_run_killed_and_resumed_has_one_run_equal_to_an_uninterrupted_one(tmp_path, monkeypatch, store,
                                                                                   request):
    if store == "server":
        uri, env = request.getfixturevalue("mlflow_server"), {}
        fault = "saved:8"  # checkpoint 8 on disk, its rows not sent yet: the resume sends them from it
    else:
        uri, env = (tmp_path / "mlruns").as_uri(), {"MLFLOW_ALLOW_FILE_STORE": "true"}
        fault = "step:11"  # mid-epoch: the rows of steps 9-10 are trained (and logged) again
    env["MLFLOW_EXPERIMENT_NAME"] = f"test-{store}"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    options = tiny(tmp_path / "killed", mlflow=uri, display_every=2)
    cnntrain.train({**options, "run_dir": str(tmp_path / "full")})
    _kill_at(options, fault, env)
    resumed = cnntrain.train({**options, "resume": "auto"})
    assert resumed.steps == 16

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    full_run, run = _mlflow_run(client, tmp_path / "full"), _mlflow_run(client, tmp_path / "killed")
    assert run.info.status == "FINISHED"
    history = _history(client, run.info.run_id)
    assert history == _history(client, full_run.info.run_id)
    assert [s for s, _ in history["train/loss"]] == list(range(2, 17, 2))
    assert [s for s, _ in history["test/top1_err"]] == [8, 16]
    # the run id travels in the checkpoints
    payload = ckpt.load_checkpoint(ckpt.latest_valid(tmp_path / "killed" / "checkpoints"))
    assert payload["callbacks"]["mlflow"]["run_id"] == run.info.run_id
    # params, tags, artifacts
    assert run.data.params["lr"] == "0.1" and run.data.params["model"] == "lenet"
    assert run.data.tags["model"] == "lenet" and run.data.tags["dataset"] == "synthetic"
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "model.safetensors", "plots"} <= top
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/curves.png"]
    local = Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path / "dl")))
    assert json.loads(local.read_text())["steps"] == 16


def _wandb_records(path: Path):
    """The records of an offline ``.wandb`` file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or last piece
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def _wandb_run(run_dir: Path) -> tuple[set[str], dict[str, list[tuple[int, float]]], dict]:
    """(run ids, stable metric history, config) over every offline run file of ``run_dir``, in order."""
    ids, history, config = set(), {}, {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "history":
                step = record.history.step.num
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if "/" in key and key.split("/", 1)[1] in STABLE:
                        history.setdefault(key, []).append((step, json.loads(item.value_json)))
    return ids, history, config


@pytest.mark.timeout(300)
def test_wandb_offline_run_killed_and_resumed_continues_the_same_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    options = tiny(tmp_path / "killed", wandb="cnntrain-test", display_every=2)
    cnntrain.train({**options, "run_dir": str(tmp_path / "full")})
    _kill_at(options, "saved:8", env)
    cnntrain.train({**options, "resume": "auto"})
    wandb.teardown()  # ends this process's wandb-core service, which writes the offline files out

    full_ids, full_history, _ = _wandb_run(tmp_path / "full")
    ids, history, config = _wandb_run(tmp_path / "killed")
    assert len(list((tmp_path / "killed" / "wandb").glob("offline-run-*"))) == 2  # killed, then resumed
    assert len(ids) == 1 and ids != full_ids
    payload = ckpt.load_checkpoint(ckpt.latest_valid(tmp_path / "killed" / "checkpoints"))
    assert payload["callbacks"]["wandb"]["run_id"] in ids
    assert history == full_history
    assert [s for s, _ in history["train/loss"]] == list(range(2, 17, 2))
    assert config["lr"] == 0.1 and config["model"] == "lenet"
    files = sorted((tmp_path / "killed" / "wandb").glob("offline-run-*"))[-1] / "files"
    assert {"config.yaml", "summary.json", "model.safetensors"} <= {p.name for p in files.iterdir()}
    assert (files / "plots" / "curves.png").is_file()


def test_a_missing_extra_is_one_clear_error(monkeypatch, tmp_path):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[mlflow\]"'):
        cnntrain.train(tiny(tmp_path / "r", mlflow="local"))
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_tracker_flags_take_an_optional_value():
    parser = build_parser()
    assert parser.parse_args(["train", "--mlflow"]).mlflow == "local"
    assert parser.parse_args(["train", "--mlflow", "http://127.0.0.1:5000"]).mlflow == "http://127.0.0.1:5000"
    assert parser.parse_args(["train", "--wandb"]).wandb == "cnntrain"
    assert parser.parse_args(["train", "--wandb", "proj"]).wandb == "proj"
    assert parser.parse_args(["train"]).wandb is None


def test_rows_become_metrics_named_by_split():
    row = {"step": 4, "epoch": 0.5, "split": "train", "loss": 2.5, "top5_err": "", "lr": 0.1}
    assert trackers.metrics_of(row) == {"train/epoch": 0.5, "train/loss": 2.5, "train/lr": 0.1}


def test_default_mlflow_store_sits_beside_the_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "local-default")
    result = cnntrain.train(tiny(tmp_path / "runs" / "a", mlflow="local", max_steps=4))
    assert (tmp_path / "runs" / "mlruns" / "mlflow.db").is_file()
    marker = json.loads((result.run_dir / "trackers.json").read_text())["mlflow"]
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlruns' / 'mlflow.db'}")
    assert client.get_run(marker["run_id"]).data.metrics["train/loss"] > 0
    shutil.rmtree(tmp_path / "runs")


@pytest.mark.timeout(300)
def test_async_ps_chief_alone_tracks_and_a_resumed_job_continues_its_run(tmp_path, monkeypatch):
    """Under async-ps the chief owns the tracker run: a job resumed with --resume auto continues it, and
    its history is metrics.csv's rows, each step once."""
    from tests.test_async_ps import _cluster_options, _run_in_threads

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "async")
    uri = (tmp_path / "mlruns").as_uri()
    run_dir = tmp_path / "run"
    _run_in_threads(_cluster_options(run_dir, 1, epochs=1, progress="none", mlflow=uri), workers=1)
    resumed = _run_in_threads(_cluster_options(run_dir, 1, epochs=2, resume="auto", progress="none", mlflow=uri),
                              workers=1)
    assert resumed.steps == 16
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    run = _mlflow_run(client, run_dir)
    history = _history(client, run.info.run_id)
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f)]
    for split, column in (("train", "loss"), ("test", "top1_err"), ("test", "loss")):
        expected = [(int(r["step"]), float(r[column])) for r in rows if r["split"] == split]
        got = history[f"{split}/{column}"]
        assert [s for s, _ in got] == [s for s, _ in expected]
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-4)  # metrics.csv rounds
    assert [s for s, _ in history["test/top1_err"]] == [8, 16]
    assert {"config.yaml", "summary.json", "model.safetensors"} <= {a.path for a in client.list_artifacts(
        run.info.run_id)}


class _Recorder(trackers.Tracker):
    name = "recorder"

    def __init__(self) -> None:
        self.sent: list[tuple[int, str]] = []

    def open(self, run_dir, cfg, run_id):
        return run_id or "run-1"

    def send(self, rows):
        self.sent += [(int(r["step"]), r["split"]) for r in rows]


def test_a_resume_from_an_older_checkpoint_sends_no_step_twice(tmp_path):
    cfg = cnntrain.build_config(**tiny(tmp_path))
    first = trackers.TrackedRun(_Recorder(), tmp_path, cfg, None)
    for step in (4, 8):
        first.add({"step": step, "split": "train", "loss": 1.0})
    old = first.state(4)  # a checkpoint at step 4 holding both rows, then one at 8 that sent them
    first.flush()
    tracker = _Recorder()
    again = trackers.TrackedRun(tracker, tmp_path, cfg, {**old, "pending": old["pending"][:1]})
    assert again.run_id == "run-1" and tracker.sent == []  # step 4 was sent already
    for step in (8, 12):  # trained again from step 4: step 8 stays as first sent
        again.add({"step": step, "split": "train", "loss": 2.0})
    again.flush()
    assert tracker.sent == [(12, "train")]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(300)
def test_an_elastic_restart_continues_the_same_mlflow_run_from_rank_0(tmp_path, monkeypatch):
    """Two ranks under --max-restarts 1; rank 1 is SIGKILLed after the checkpoint at step 12: the
    restarted job resumes from it and rank 0 continues the same MLflow run, each step once."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    run_dir = tmp_path / "run"
    options = tiny(run_dir, batch_size=16, epochs=3, lr=0.05, save_every=4, display_every=2, mlflow=uri)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update({"MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_EXPERIMENT_NAME": "elastic", "CNNTRAIN_FAULT": "step:14",
                "CNNTRAIN_FAULT_RANK": "1", "CNNTRAIN_FAULT_MARKER": str(tmp_path / "killed"),
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(FAULTS), str(REPO), os.environ.get("PYTHONPATH")]))})
    out = subprocess.run([sys.executable, "-m", "cnntrain", "train", "--nproc-per-node", "2", "--max-restarts", "1",
                          *cli_args(options), "--callbacks", "injection:FaultInjection"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "killed").exists() and "resumed from" in out.stderr
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    history = _history(client, _mlflow_run(client, run_dir).info.run_id)
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for split, column in (("train", "loss"), ("test", "top1_err")):
        expected = [(int(r["step"]), float(r[column])) for r in rows if r["split"] == split]
        got = history[f"{split}/{column}"]
        assert [s for s, _ in got] == [s for s, _ in expected] and len({s for s, _ in got}) == len(got)
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-4)
