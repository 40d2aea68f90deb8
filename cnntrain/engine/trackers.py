"""Experiment trackers (MLflow, Weights & Biases) fed by the training loop, on rank 0 (the chief under async-ps).

    cnntrain train ... --mlflow                          # SQLite store in <runs>/mlruns, beside the run folders
    cnntrain train ... --mlflow http://127.0.0.1:5000    # any MLflow tracking URI
    cnntrain train ... --wandb my-project                # WANDB_MODE=offline works

A tracker gets the resolved config as params, every metrics.csv row as metrics at its step
(``train/loss``, ``val/top1_err``, ...), tags for the model and the data set, and at the end the run
folder's files (config.yaml, plots/curves.png, summary.json, model.safetensors) as artifacts.

A resumed run (``--resume auto``, an elastic restart) continues the same tracker run with no step
sent twice and none missing. Rows reach the tracker only once a checkpoint that holds them is on disk:
each checkpoint carries the tracker's run id and the rows not yet sent (``payload["callbacks"]``), and
``<run-dir>/trackers.json`` records the last step sent. A resume sends the rows of its checkpoint
that the tracker lacks; the rows after the checkpoint are trained again and sent as they recur.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from cnntrain.engine.callbacks import Callback
from cnntrain.errors import ConfigError

log = logging.getLogger("cnntrain")

MARKER = "trackers.json"
ARTIFACTS = ("config.yaml", "plots/curves.png", "summary.json", "model.safetensors")
_EXTRAS = {"mlflow": ("mlflow", "--mlflow"), "wandb": ("wandb", "--wandb")}


def require(module: str) -> None:
    """A ConfigError naming the pip command when an optional extra is not installed."""
    if importlib.util.find_spec(module) is None:
        extra, flag = _EXTRAS.get(module, (module, module))
        raise ConfigError(f"{flag} needs the {module} package, which is not installed: "
                          f'pip install -e ".[{extra}]" (or pip install {module})')


def metrics_of(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.csv row as tracker metrics: ``<split>/<column>`` for each number in it."""
    split, out = row.get("split", "train"), {}
    for key, value in row.items():
        if key in ("step", "split") or value in ("", None):
            continue
        try:
            out[f"{split}/{key}"] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def params_of(cfg) -> dict[str, str]:
    """The resolved config as flat string params (lists and dicts written as JSON)."""
    out = {}
    for key, value in cfg.to_dict().items():
        out[key] = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return out


class Tracker:
    """One external tracker. ``open`` creates a run, or reopens ``run_id``, and returns its id."""

    name = ""

    def open(self, run_dir: Path, cfg, run_id: str | None) -> str:
        raise NotImplementedError

    def send(self, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def already_sent(self, rows: list[dict[str, Any]]) -> set[tuple[str, int]]:
        """(metric, step) pairs among ``rows`` the tracker holds already (beyond what trackers.json says)."""
        return set()

    def upload(self, run_dir: Path, files: list[Path]) -> None:
        raise NotImplementedError

    def close(self, summary: dict[str, Any]) -> None:
        raise NotImplementedError


class MlflowTracker(Tracker):
    """MLflow through ``MlflowClient`` (no global state): params, metrics with steps, tags, artifacts."""

    name = "mlflow"

    def __init__(self, uri: str) -> None:
        require("mlflow")
        self.uri = uri

    def _resolve_uri(self, run_dir: Path) -> tuple[str, str | None]:
        if self.uri not in ("", "local"):
            return self.uri, None
        store = (run_dir.resolve().parent / "mlruns")
        store.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()

    def open(self, run_dir: Path, cfg, run_id: str | None) -> str:
        from mlflow.tracking import MlflowClient

        uri, artifacts = self._resolve_uri(run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "cnntrain")
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
            except Exception:  # noqa: BLE001 - another run created it meanwhile
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        tags = {"model": cfg.model, "dataset": cfg.dataset, "run_dir": str(run_dir), "strategy": cfg.strategy}
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags).info.run_id
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in params_of(cfg).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        return self.run_id

    def send(self, rows: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, int(row["step"])) for row in rows
                   for key, value in metrics_of(row).items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def already_sent(self, rows: list[dict[str, Any]]) -> set[tuple[str, int]]:
        keys = {key for row in rows for key in metrics_of(row)}
        return {(key, m.step) for key in keys for m in self.client.get_metric_history(self.run_id, key)}

    def upload(self, run_dir: Path, files: list[Path]) -> None:
        for path in files:
            folder = str(path.parent.relative_to(run_dir)) if path.parent != run_dir else None
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def close(self, summary: dict[str, Any]) -> None:
        if summary.get("stopped"):
            self.client.set_tag(self.run_id, "stopped", str(summary["stopped"]))
        self.client.set_terminated(self.run_id, "FINISHED")


class WandbTracker(Tracker):
    """Weights & Biases: ``wandb.init(id=..., resume="allow")`` reopens the run; files saved with it."""

    name = "wandb"

    def __init__(self, project: str) -> None:
        require("wandb")
        self.project = project

    def open(self, run_dir: Path, cfg, run_id: str | None) -> str:
        import wandb

        self.run = wandb.init(project=self.project, id=run_id, resume="allow" if run_id else None,
                              dir=str(run_dir), name=run_dir.name, config=cfg.to_dict(),
                              tags=[cfg.model, cfg.dataset])
        return self.run.id

    def send(self, rows: list[dict[str, Any]]) -> None:
        by_step: dict[int, dict[str, float]] = {}
        for row in rows:
            by_step.setdefault(int(row["step"]), {}).update(metrics_of(row))
        for step in sorted(by_step):  # W&B wants each step once, in order
            self.run.log(by_step[step], step=step)

    def upload(self, run_dir: Path, files: list[Path]) -> None:
        for path in files:
            self.run.save(str(path), base_path=str(run_dir), policy="now")

    def close(self, summary: dict[str, Any]) -> None:
        for key in ("best_top1", "final_top1", "final_loss", "steps", "stopped"):
            if summary.get(key) is not None:
                self.run.summary[key] = summary[key]
        self.run.finish()


def make_trackers(cfg) -> list[Tracker]:
    """The trackers ``--mlflow`` / ``--wandb`` ask for (a ConfigError when an extra is missing)."""
    out: list[Tracker] = []
    if cfg.mlflow:
        out.append(MlflowTracker(cfg.mlflow))
    if cfg.wandb:
        out.append(WandbTracker(cfg.wandb))
    return out


def _read_marker(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / MARKER).read_text())
    except (OSError, ValueError):
        return {}


class TrackedRun:
    """One tracker run of one cnntrain run: rows are held until a checkpoint holds them, then sent.

    ``saved``: what the resumed checkpoint kept for this tracker (``state()``), None for a new run."""

    def __init__(self, tracker: Tracker, run_dir: Path, cfg, saved: dict[str, Any] | None) -> None:
        self.tracker, self.run_dir, self.pending = tracker, run_dir, []
        # The checkpoint names the run; without one (killed before the first), the folder's marker does.
        marker = {} if cfg.overwrite else _read_marker(run_dir).get(tracker.name, {})
        run_id = (saved or {}).get("run_id") or marker.get("run_id")
        self.sent_through = int(marker.get("sent_through", -1)) if marker.get("run_id") == run_id else -1
        self.run_id = tracker.open(run_dir, cfg, run_id)
        if run_id:
            log.info("%s: continuing run %s", tracker.name, self.run_id)
        self._mark()
        rows = (saved or {}).get("pending", [])
        self.skip_through = -1  # resumed from an older checkpoint than the last one sent: do not send twice
        if saved and saved.get("step", self.sent_through) < self.sent_through:
            self.skip_through = self.sent_through
            log.warning("%s: resuming at step %d, before the last step sent (%d): steps up to %d keep the values "
                        "first sent", tracker.name, saved["step"], self.sent_through, self.sent_through)
        self.pending = list(rows)
        if self.pending:
            self.flush(resumed=True)

    def add(self, row: dict[str, Any]) -> None:
        self.pending.append(dict(row))

    def state(self, step: int) -> dict[str, Any]:
        """What a checkpoint at ``step`` keeps: the run id and the rows not sent yet."""
        return {"run_id": self.run_id, "pending": list(self.pending), "step": step}

    def flush(self, resumed: bool = False) -> None:
        """Send the held rows (once a checkpoint holds them). ``resumed``: rows a resumed checkpoint
        kept, sent only where the tracker lacks them (a kill may have come after they were sent)."""
        rows = [r for r in self.pending if int(r["step"]) > self.skip_through]
        if resumed:
            rows = [r for r in rows if int(r["step"]) > self.sent_through]
            have = self.tracker.already_sent(rows) if rows else set()
            rows = [r for r in rows if not all((k, int(r["step"])) in have for k in metrics_of(r))]
        if rows:
            self.tracker.send(rows)
            self.sent_through = max(self.sent_through, max(int(r["step"]) for r in rows))
        self.pending = []
        self._mark()

    def _mark(self) -> None:
        marker = _read_marker(self.run_dir)
        marker[self.tracker.name] = {"run_id": self.run_id, "sent_through": self.sent_through}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / f".{MARKER}.tmp"
        tmp.write_text(json.dumps(marker, indent=1))
        os.replace(tmp, self.run_dir / MARKER)

    def close(self, summary: dict[str, Any]) -> None:
        """The run's files as artifacts and the run marked finished (after summary.json is written)."""
        self.flush()
        self.tracker.upload(self.run_dir, [self.run_dir / f for f in ARTIFACTS if (self.run_dir / f).is_file()])
        self.tracker.close(summary)


class TrackerCallback(Callback):
    """A tracker as a callback of the loop, on rank 0 only."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker, self.saved, self.run = tracker, None, None

    def on_load_checkpoint(self, loop, payload: dict[str, Any]) -> None:
        self.saved = (payload.get("callbacks") or {}).get(self.tracker.name)

    def on_train_start(self, loop) -> None:
        if loop.is_main:
            self.run = TrackedRun(self.tracker, loop.run_dir, loop.cfg, self.saved)

    def on_log(self, loop, row: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.add(row)

    def on_eval_end(self, loop, result) -> None:
        if self.run is not None:
            self.run.add({"step": loop.state.step, "epoch": loop.state.step / loop.steps_per_epoch,
                          "split": loop.data.val_name, "loss": result.loss, "top1_err": result.top1_err,
                          "top5_err": result.top5_err, "lr": loop.lr})

    def on_save_checkpoint(self, loop, payload: dict[str, Any], path) -> None:
        if self.run is not None:
            payload.setdefault("callbacks", {})[self.tracker.name] = self.run.state(loop.state.step)

    def on_checkpoint(self, loop, path) -> None:
        if self.run is not None:
            self.run.flush()

    def on_run_end(self, loop, summary: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.close(summary)


def tracker_callbacks(cfg) -> list[Callback]:
    return [TrackerCallback(t) for t in make_trackers(cfg)]
