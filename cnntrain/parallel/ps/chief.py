"""What the chief does besides training as worker 0: it owns the run folder.

It initialises the ps (fresh weights, or a checkpoint's weights and optimizer state with
``--resume``), writes ``config.yaml`` and the training rows of ``metrics.csv``, logs the staleness
distribution, updates/s per worker and lost / rejoined workers, saves checkpoints (snapshots of
every ps) at each epoch of updates or ``--save-every`` updates, scores the final weights, and
writes ``summary.json`` and ``model.safetensors`` before it tells the ps to finish.

With an evaluator connected, a checkpoint is pruned only once the evaluator has scored it.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn as nn

from cnntrain.config import TrainConfig, save_config
from cnntrain.data.datasets import DataBundle
from cnntrain.data.loaders import build_eval_loader
from cnntrain.engine import checkpoint as ckpt
from cnntrain.engine.evaluate import EvalResult, evaluate
from cnntrain.engine.metrics import MetricsLog, TrainWindow
from cnntrain.engine.optim import lr_at, scaled_lr
from cnntrain.engine.precision import LossScaler
from cnntrain.engine.progress import Progress
from cnntrain.engine.run import Result, claim_run_dir, finish_run, resolve_run_dir, run_meta
from cnntrain.engine.state import TrainState
from cnntrain.engine.step import StepOutcome
from cnntrain.engine.trackers import TrackedRun, make_trackers
from cnntrain.engine.trainer import init_from_data
from cnntrain.hardware import peak_memory_mb
from cnntrain.models import count_parameters
from cnntrain.parallel.ps.client import PsClient, Stats
from cnntrain.parallel.ps.cluster import WORKER, Cluster, ShardPlan, role_name

log = logging.getLogger("cnntrain")


def staleness_summary(hist: list[int]) -> str:
    """'mean 0.8, p50 1, p90 2, max 3' from a histogram of counts per staleness."""
    total = sum(hist)
    if not total:
        return "no updates yet"
    mean = sum(i * c for i, c in enumerate(hist)) / total

    def quantile(q: float) -> int:
        seen = 0
        for i, c in enumerate(hist):
            seen += c
            if seen >= q * total:
                return i
        return len(hist) - 1

    top = max(i for i, c in enumerate(hist) if c)
    return f"mean {mean:.2f}, p50 {quantile(0.5)}, p90 {quantile(0.9)}, max {top}{'+' if top == len(hist) - 1 else ''}"


def staleness_shares(hist: list[int]) -> str:
    total = max(sum(hist), 1)
    return ", ".join(f"{i}: {100 * c / total:.1f}%" for i, c in enumerate(hist) if c)


class Chief:
    def __init__(self, cfg: TrainConfig, cluster: Cluster, client: PsClient, data: DataBundle, model: nn.Module,
                 plan: ShardPlan, device: torch.device, steps_per_epoch: int, total_steps: int,
                 scaler: LossScaler) -> None:
        self.cfg, self.cluster, self.client, self.data = cfg, cluster, client, data
        self.model, self.plan, self.device = model, plan, device
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.base_lr = scaled_lr(cfg, cfg.batch_size * cfg.accum_steps)  # one worker's update is one batch
        self.meta = run_meta(cfg, data)
        self.val_loader = (build_eval_loader(cfg, data.val, device, data.mean, data.std)
                           if data.val is not None else None)
        # The checkpoint holds what the sync trainer's holds, but the optimizer state comes from the ps.
        self.state = TrainState(model, scaler, TrainWindow(device))
        self.last_eval: EvalResult | None = None
        self.last_train = (float("nan"), float("nan"))

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        cfg, model, state = self.cfg, self.model, self.state
        stamp = int(time.time())
        self.run_dir = resolve_run_dir(cfg, stamp)
        self.lock = claim_run_dir(self.run_dir, resuming=bool(cfg.resume), overwrite=cfg.overwrite)
        resume_path = ckpt.resolve_resume(cfg.resume, self.run_dir)
        self.run_id = (ckpt.run_id_of(resume_path) if resume_path is not None else None) or ckpt.new_run_id()
        if resume_path is None:
            init_from_data(model, self.data, self.device)
        else:
            state.restore(ckpt.load_checkpoint(resume_path), resume_path)
            log.info("resumed from %s at update %d (epoch %.2f)", resume_path, state.step,
                     state.step / self.steps_per_epoch)
        saved = state.extra.get("callbacks") or {}  # the trackers' run ids and unsent rows
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)  # a refused resume touches nothing
        save_config(cfg, self.run_dir / "config.yaml")
        self.tracked = [TrackedRun(t, self.run_dir, cfg, saved.get(t.name)) for t in make_trackers(cfg)]
        step = state.step
        self.metrics = MetricsLog(self.run_dir / "metrics.csv", resume_step=step if resume_path else None,
                                  tensorboard_dir=self.run_dir / "tb" if cfg.tensorboard else None)
        c, h, w = self.data.shape
        self.client.init(model, self.plan, (step, self.data.num_classes, c, h, w, self.steps_per_epoch,
                                            self.total_steps, self.base_lr, stamp), state.extra.get("ps_optimizer"))
        self._log_start()
        self.progress = Progress(cfg.progress, self.total_steps, step, True)
        self.started = self.last_save = time.perf_counter()
        self.saved_step = step if resume_path else -1
        self.saved_steps: list[int] = []
        self.start_step = self.window_version = step
        self.marks = {"display": step // cfg.display_every, "epoch": step // self.steps_per_epoch,
                      "save": step // cfg.save_every if cfg.save_every else 0,
                      "eval": step // cfg.eval_every if cfg.eval_every else 0}
        self.previous: Stats | None = None
        self.rate_mark = (time.perf_counter(), [0] * self.cluster.num_workers)

    def _log_start(self) -> None:
        cfg = self.cfg
        log.info("%s: %s, %d parameters on %d ps (%s values) | %s: %d train, %d %s images | %d workers x batch %d%s, "
                 "lr %g, %d updates/epoch, %d updates | %s",
                 self.run_dir, cfg.model, count_parameters(self.model), self.cluster.num_ps,
                 " / ".join(str(self.plan.numel_of(k)) for k in range(self.cluster.num_ps)), cfg.dataset,
                 len(self.data.train), len(self.data.val) if self.data.val else 0, self.data.val_name,
                 self.cluster.num_workers, cfg.batch_size,
                 f" x {cfg.accum_steps} accumulated" if cfg.accum_steps > 1 else "", self.base_lr,
                 self.steps_per_epoch, self.total_steps,
                 f"max staleness {cfg.max_staleness}" if cfg.max_staleness >= 0 else "staleness unbounded")

    def elapsed(self) -> float:
        return self.state.elapsed_before + time.perf_counter() - self.started

    def _crossed(self, key: str, version: int, every: int) -> bool:
        if every <= 0 or version // every <= self.marks[key]:
            return False
        self.marks[key] = version // every
        return True

    # ------------------------------------------------------------------ each step
    def after_step(self, version: int, outcome: StepOutcome) -> None:
        cfg, window = self.cfg, self.state.window
        for loss, logits, labels in outcome.micro:
            window.add(loss, logits, labels)
        window.add_step(outcome.grad_norm if outcome.grads_ok else outcome.grad_norm * 0)
        self.progress.step(min(version, self.total_steps))
        if self._crossed("display", version, cfg.display_every):
            self._log_window(version)
        pause = time.perf_counter()
        if self._crossed("eval", version, cfg.eval_every):
            self._evaluate(version)
        timed = cfg.save_interval and time.perf_counter() - self.last_save >= cfg.save_interval
        by_epoch = not cfg.save_every and self._crossed("epoch", version, self.steps_per_epoch)
        if by_epoch or self._crossed("save", version, cfg.save_every) or timed:
            self._save()
        window.paused += time.perf_counter() - pause

    def _log_window(self, version: int) -> None:
        window = self.state.window
        loss_sum, correct, count = window.sums.tolist()
        seconds = max(time.perf_counter() - window.started - window.paused, 1e-9)
        img_s = (version - self.window_version) * self.cfg.batch_size * self.cfg.accum_steps / seconds
        self.last_train = (loss_sum / max(count, 1), 1 - correct / max(count, 1))
        lr = lr_at(min(version, self.total_steps - 1), self.cfg, self.base_lr, self.steps_per_epoch, self.total_steps)
        grad_norm = float(window.grad_norm) / max(window.steps, 1)
        epoch = version / self.steps_per_epoch
        self._write(step=version, epoch=epoch, split="train", loss=self.last_train[0],
                    top1_err=self.last_train[1], top5_err="", lr=lr, img_per_s=img_s, elapsed_s=self.elapsed(),
                    loss_scale=self.state.scaler.scale, grad_norm=grad_norm)
        self.progress.report(version, epoch, self.last_train[0], self.last_train[1], lr, img_s, 0.0)
        self._log_stats(self.client.stats())
        window.reset()
        self.window_version = version

    def _log_stats(self, st: Stats) -> None:
        """Staleness so far, updates/s per worker since the last report, workers lost and back."""
        now, before = time.perf_counter(), self.rate_mark
        span = max(now - before[0], 1e-9)
        rates = [(u - b) / span for u, b in zip(st.updates, before[1])]
        self.rate_mark = (now, list(st.updates))
        per_worker = ", ".join(f"{'chief' if i == 0 else f'worker {i}'} {r:.1f}" + ("" if st.alive[i] else " (gone)")
                               for i, r in enumerate(rates))
        self.progress.write(f"staleness {staleness_summary(st.staleness)} | updates/s: {per_worker} | "
                            f"{sum(st.alive)} of {self.cluster.num_workers} workers connected")
        if self.previous is not None:
            for i in range(1, self.cluster.num_workers):
                if st.losses[i] > self.previous.losses[i]:
                    log.warning("%s was lost at update %d; the job goes on with %d worker(s)", role_name(WORKER, i),
                                st.version, sum(st.alive))
                if st.joins[i] > self.previous.joins[i] and self.previous.joins[i] > 0:
                    log.warning("%s rejoined at update %d", role_name(WORKER, i), st.version)
        self.previous = st

    def _write(self, **row) -> None:
        """A metrics.csv row, also held for the trackers (sent once a checkpoint holds it)."""
        self.metrics.write(**row)
        for tracked in self.tracked:
            tracked.add(row)

    # ------------------------------------------------------------------ snapshots
    def _load_snapshot(self) -> tuple[int, dict]:
        """The current weights of every ps into the chief's model; (version, ps optimizer state)."""
        version, values, optimizer_state = self.client.snapshot(self.plan)
        state = self.model.state_dict()
        for name, value in values.items():
            state[name] = value.to(state[name].dtype)
        self.model.load_state_dict(state)
        return version, optimizer_state

    def _save(self, best: bool = False, snapshot: tuple[int, dict] | None = None) -> None:
        version, optimizer_state = snapshot or self._load_snapshot()
        self.last_save = time.perf_counter()
        if version == self.saved_step and not best:
            return
        st = self.client.stats()
        self.state.step = version
        self.state.extra = {"ps_optimizer": optimizer_state,
                            "async_ps": {"ps": self.cluster.num_ps, "workers": self.cluster.num_workers,
                                         "staleness": st.staleness, "updates": st.updates}}
        payload = self.state.to_checkpoint(elapsed=self.elapsed(), config=self.cfg.to_dict(), meta=self.meta,
                                           epoch=version / self.steps_per_epoch,
                                           global_batch=self.cfg.batch_size * self.cfg.accum_steps,
                                           world_size=self.cluster.num_workers)
        if self.tracked:
            payload["callbacks"] = {t.tracker.name: t.state(version) for t in self.tracked}
        # With an evaluator connected, a checkpoint it has not scored yet is kept.
        scored = st.scored_step if st.evaluator else None
        ckpt.save_checkpoint(payload, self.run_dir / "checkpoints", version, keep_last=self.cfg.keep_last, best=best,
                             run_id=self.run_id, protect=lambda step: scored is not None and step > scored)
        for tracked in self.tracked:
            tracked.flush()
        self.saved_step = version
        if version not in self.saved_steps:
            self.saved_steps.append(version)

    def _evaluate(self, version: int) -> EvalResult | None:
        if self.val_loader is None:
            return None
        result = evaluate(self.model, self.val_loader.iterate(0), self.data.num_classes, precision=self.cfg.precision,
                          device=self.device, tta_flip=self.cfg.tta_flip, tta_translate=self.cfg.tta_translate)
        self.last_eval = result
        self.state.best_top1 = max(self.state.best_top1, result.top1)
        self._write(step=version, epoch=version / self.steps_per_epoch, split=self.data.val_name,
                    loss=result.loss, top1_err=result.top1_err, top5_err=result.top5_err, elapsed_s=self.elapsed())
        self.progress.write(f"update {version}: {self.data.val_name} top-1 {100 * result.top1:.2f}% "
                            f"loss {result.loss:.4f} ({result.count} images)")
        return result

    # ------------------------------------------------------------------ end
    def finish(self) -> Result:
        seconds = time.perf_counter() - self.started
        snapshot = self._load_snapshot()
        version = snapshot[0]
        best_before, scaler = self.state.best_top1, self.state.scaler
        result = self._evaluate(version)
        self._save(best=result is not None and result.top1 > best_before, snapshot=snapshot)
        st = self.client.stats()
        self.progress.close()
        self.metrics.close()
        workers = {("chief" if i == 0 else f"worker {i}"): {"updates": st.updates[i],
                                                            "updates_per_s": st.updates[i] / max(seconds, 1e-9),
                                                            "lost": st.losses[i], "joins": st.joins[i]}
                   for i in range(self.cluster.num_workers)}
        done = version - self.start_step
        summary = {
            "run_dir": str(self.run_dir), "dataset": self.cfg.dataset, "model": self.cfg.model,
            "parameters": count_parameters(self.model), "steps": version, "epochs": version / self.steps_per_epoch,
            "global_batch": self.cfg.batch_size * self.cfg.accum_steps, "world_size": self.cluster.num_workers,
            "device": str(self.device),
            "precision": self.cfg.precision, "strategy": "async-ps", "ps": self.cluster.num_ps,
            "max_staleness": self.cfg.max_staleness, "best_top1": self.state.best_top1,
            "final_top1": result.top1 if result else None, "final_top5": result.top5 if result else None,
            "final_loss": result.loss if result else None, "eval_split": self.data.val_name,
            "eval_images": result.count if result else 0, "train_seconds": seconds, "total_seconds": self.elapsed(),
            "img_per_s": done * self.cfg.batch_size * self.cfg.accum_steps / max(seconds, 1e-9),
            "updates_per_s": done / max(seconds, 1e-9), "staleness_histogram": _trim(st.staleness),
            "workers": workers, "checkpoint_steps": self.saved_steps, "skipped_steps": scaler.skipped,
            "loss_scale": scaler.scale, "peak_memory_mb": peak_memory_mb(self.device),
        }
        finish_run(self.run_dir, self.model, self.meta, summary)
        for tracked in self.tracked:
            tracked.close(summary)
        lost = [f"{name} ({w['lost']}x lost, {w['joins'] - 1}x rejoined)" for name, w in workers.items() if w["lost"]]
        log.info("staleness distribution (updates behind: share of %d updates): %s", sum(st.staleness),
                 staleness_shares(st.staleness))
        log.info("updates/s per worker: %s%s", ", ".join(f"{n} {w['updates_per_s']:.2f}" for n, w in workers.items()),
                 f" | lost during training: {', '.join(lost)}" if lost else "")
        log.info("done: %d updates in %.1f s (%.1f img/s); %s top-1 %.2f%% (best %.2f%%); %s", version, seconds,
                 summary["img_per_s"], self.data.val_name, 100 * (summary["final_top1"] or 0),
                 100 * self.state.best_top1,
                 self.run_dir)
        self.client.finish()
        self.lock.release()
        return Result(self.run_dir, self.state.best_top1, summary["final_top1"] or 0.0, version, seconds,
                      summary["img_per_s"], summary)


def _trim(hist: list[int]) -> list[int]:
    last = max((i for i, c in enumerate(hist) if c), default=-1)
    return hist[:last + 1]
