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
from pathlib import Path

import torch
import torch.nn as nn

from cnntrain.config import TrainConfig, save_config
from cnntrain.data.datasets import DataBundle
from cnntrain.data.loaders import build_eval_loader
from cnntrain.engine import checkpoint as ckpt
from cnntrain.engine.evaluate import EvalResult, evaluate
from cnntrain.engine.metrics import MetricsLog, TrainWindow, write_summary
from cnntrain.engine.optim import lr_at
from cnntrain.engine.precision import LossScaler
from cnntrain.engine.progress import Progress
from cnntrain.engine.run import export_safetensors, peak_memory_mb, resolve_run_dir
from cnntrain.engine.trainer import Result
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
                 plan: ShardPlan, device: torch.device, steps_per_epoch: int, total_steps: int) -> None:
        self.cfg, self.cluster, self.client, self.data = cfg, cluster, client, data
        self.model, self.plan, self.device = model, plan, device
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.base_lr = cfg.lr * (cfg.batch_size / cfg.scale_lr if cfg.scale_lr else 1.0)
        self.meta = {"model": cfg.model, "num_classes": data.num_classes, "classes": data.classes,
                     "input_shape": list(data.shape), "mean": list(data.mean), "std": list(data.std),
                     "config": cfg.to_dict()}
        self.val_loader = (build_eval_loader(cfg, data.val, device, data.mean, data.std)
                           if data.val is not None else None)
        self.window = TrainWindow(device)
        self.best_top1 = 0.0
        self.elapsed_before = 0.0
        self.last_eval: EvalResult | None = None
        self.last_train = (float("nan"), float("nan"))

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        cfg, model = self.cfg, self.model
        stamp = int(time.time())
        self.run_dir = resolve_run_dir(cfg, stamp)
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")
        resume_path = ckpt.resolve_resume(cfg.resume, self.run_dir)
        step, optimizer_state = 0, None
        if resume_path is None and hasattr(model, "init_from_data"):
            sample = self.data.train.images[:5000].to(self.device, torch.float32) / 255
            mean = torch.tensor(self.data.mean, device=self.device).view(1, -1, 1, 1)
            std = torch.tensor(self.data.std, device=self.device).view(1, -1, 1, 1)
            model.init_from_data((sample - mean) / std)
        if resume_path is not None:
            state = ckpt.load_checkpoint(resume_path)
            model.load_state_dict(state["model"])
            optimizer_state = state.get("ps_optimizer")
            step, self.best_top1, self.elapsed_before = state["step"], state["best_top1"], state["elapsed"]
            log.info("resumed from %s at update %d (epoch %.2f)", resume_path, step, step / self.steps_per_epoch)
        self.metrics = MetricsLog(self.run_dir / "metrics.csv", resume_step=step if resume_path else None,
                                  tensorboard_dir=self.run_dir / "tb" if cfg.tensorboard else None)
        c, h, w = self.data.shape
        self.client.init(model, self.plan, (step, self.data.num_classes, c, h, w, self.steps_per_epoch,
                                            self.total_steps, self.base_lr, stamp), optimizer_state)
        log.info("%s: %s, %d parameters on %d ps (%s values) | %s: %d train, %d %s images | %d workers x batch %d, "
                 "lr %g, %d updates/epoch, %d updates | %s",
                 self.run_dir, cfg.model, count_parameters(model), self.cluster.num_ps,
                 " / ".join(str(self.plan.numel_of(k)) for k in range(self.cluster.num_ps)), cfg.dataset,
                 len(self.data.train), len(self.data.val) if self.data.val else 0, self.data.val_name,
                 self.cluster.num_workers, cfg.batch_size, self.base_lr, self.steps_per_epoch, self.total_steps,
                 f"max staleness {cfg.max_staleness}" if cfg.max_staleness >= 0 else "staleness unbounded")
        self.progress = Progress(cfg.progress, self.total_steps, step, True)
        self.started = time.perf_counter()
        self.last_save = self.started
        self.saved_step = step if resume_path else -1
        self.saved_steps: list[int] = []
        self.start_step = step
        self.window_version = step
        self.marks = {"display": step // cfg.display_every, "epoch": step // self.steps_per_epoch,
                      "save": step // cfg.save_every if cfg.save_every else 0,
                      "eval": step // cfg.eval_every if cfg.eval_every else 0}
        self.previous: Stats | None = None
        self.rate_mark = (time.perf_counter(), [0] * self.cluster.num_workers)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def _crossed(self, key: str, version: int, every: int) -> bool:
        if every <= 0 or version // every <= self.marks[key]:
            return False
        self.marks[key] = version // every
        return True

    # ------------------------------------------------------------------ each step
    def after_step(self, version: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                   grad_norm: torch.Tensor, scaler: LossScaler) -> None:
        cfg = self.cfg
        self.window.add(loss, logits, labels)
        self.window.add_step(grad_norm)
        self.progress.step(min(version, self.total_steps))
        if self._crossed("display", version, cfg.display_every):
            self._log_window(version, scaler)
        pause = time.perf_counter()
        if self._crossed("eval", version, cfg.eval_every):
            self._evaluate(version)
        timed = cfg.save_interval and time.perf_counter() - self.last_save >= cfg.save_interval
        by_epoch = not cfg.save_every and self._crossed("epoch", version, self.steps_per_epoch)
        if by_epoch or self._crossed("save", version, cfg.save_every) or timed:
            self._save()
        self.window.paused += time.perf_counter() - pause

    def _log_window(self, version: int, scaler: LossScaler) -> None:
        loss_sum, correct, count = self.window.sums.tolist()
        seconds = max(time.perf_counter() - self.window.started - self.window.paused, 1e-9)
        img_s = (version - self.window_version) * self.cfg.batch_size / seconds
        self.last_train = (loss_sum / max(count, 1), 1 - correct / max(count, 1))
        lr = lr_at(min(version, self.total_steps - 1), self.cfg, self.base_lr, self.steps_per_epoch, self.total_steps)
        grad_norm = float(self.window.grad_norm) / max(self.window.steps, 1)
        epoch = version / self.steps_per_epoch
        self.metrics.write(step=version, epoch=epoch, split="train", loss=self.last_train[0],
                           top1_err=self.last_train[1], top5_err="", lr=lr, img_per_s=img_s, elapsed_s=self.elapsed(),
                           loss_scale=scaler.scale, grad_norm=grad_norm)
        self.progress.report(version, epoch, self.last_train[0], self.last_train[1], lr, img_s, 0.0)
        self._log_stats(self.client.stats())
        self.window.sums.zero_()
        self.window.grad_norm.zero_()
        self.window.steps = 0
        self.window.paused = 0.0
        self.window.started = time.perf_counter()
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
        state = {"model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                 "ps_optimizer": optimizer_state, "step": version, "epoch": version / self.steps_per_epoch,
                 "best_top1": self.best_top1, "elapsed": self.elapsed(), "config": self.cfg.to_dict(),
                 "meta": self.meta, "async_ps": {"ps": self.cluster.num_ps, "workers": self.cluster.num_workers,
                                                 "staleness": st.staleness, "updates": st.updates}}
        folder = self.run_dir / "checkpoints"
        ckpt.save_checkpoint(state, folder, version, keep_last=0, best=best)
        self.saved_step = version
        if version not in self.saved_steps:
            self.saved_steps.append(version)
        prune_scored(folder, self.cfg.keep_last, st.scored_step if st.evaluator else None)

    def _evaluate(self, version: int) -> EvalResult | None:
        if self.val_loader is None:
            return None
        result = evaluate(self.model, self.val_loader.iterate(0), self.data.num_classes, precision=self.cfg.precision,
                          device=self.device, tta_flip=self.cfg.tta_flip, tta_translate=self.cfg.tta_translate)
        self.last_eval = result
        self.best_top1 = max(self.best_top1, result.top1)
        self.metrics.write(step=version, epoch=version / self.steps_per_epoch, split=self.data.val_name,
                           loss=result.loss, top1_err=result.top1_err, top5_err=result.top5_err,
                           elapsed_s=self.elapsed())
        self.progress.write(f"update {version}: {self.data.val_name} top-1 {100 * result.top1:.2f}% "
                            f"loss {result.loss:.4f} ({result.count} images)")
        return result

    # ------------------------------------------------------------------ end
    def finish(self, scaler: LossScaler) -> Result:
        seconds = time.perf_counter() - self.started
        snapshot = self._load_snapshot()
        version = snapshot[0]
        best_before = self.best_top1
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
            "global_batch": self.cfg.batch_size, "world_size": self.cluster.num_workers, "device": str(self.device),
            "precision": self.cfg.precision, "strategy": "async-ps", "ps": self.cluster.num_ps,
            "max_staleness": self.cfg.max_staleness, "best_top1": self.best_top1,
            "final_top1": result.top1 if result else None, "final_top5": result.top5 if result else None,
            "final_loss": result.loss if result else None, "eval_split": self.data.val_name,
            "eval_images": result.count if result else 0, "train_seconds": seconds, "total_seconds": self.elapsed(),
            "img_per_s": done * self.cfg.batch_size / max(seconds, 1e-9),
            "updates_per_s": done / max(seconds, 1e-9), "staleness_histogram": _trim(st.staleness),
            "workers": workers, "checkpoint_steps": self.saved_steps, "skipped_steps": scaler.skipped,
            "loss_scale": scaler.scale, "peak_memory_mb": peak_memory_mb(self.device),
        }
        export_safetensors(self.model, self.run_dir / "model.safetensors", self.meta)
        write_summary(self.run_dir / "summary.json", summary)
        lost = [f"{name} ({w['lost']}x lost, {w['joins'] - 1}x rejoined)" for name, w in workers.items() if w["lost"]]
        log.info("staleness distribution (updates behind: share of %d updates): %s", sum(st.staleness),
                 staleness_shares(st.staleness))
        log.info("updates/s per worker: %s%s", ", ".join(f"{n} {w['updates_per_s']:.2f}" for n, w in workers.items()),
                 f" | lost during training: {', '.join(lost)}" if lost else "")
        log.info("done: %d updates in %.1f s (%.1f img/s); %s top-1 %.2f%% (best %.2f%%); %s", version, seconds,
                 summary["img_per_s"], self.data.val_name, 100 * (summary["final_top1"] or 0), 100 * self.best_top1,
                 self.run_dir)
        self.client.finish()
        return Result(self.run_dir, self.best_top1, summary["final_top1"] or 0.0, version, seconds,
                      summary["img_per_s"], summary)


def _trim(hist: list[int]) -> list[int]:
    last = max((i for i, c in enumerate(hist) if c), default=-1)
    return hist[:last + 1]


def prune_scored(folder: Path, keep_last: int, scored_step: int | None) -> None:
    """Keep the newest ``keep_last`` step checkpoints; with an evaluator, also every one it has not
    scored yet (``scored_step``: the newest it has scored)."""
    if keep_last <= 0:
        return
    for step, path in ckpt.list_checkpoints(folder)[:-keep_last]:
        if scored_step is None or step <= scored_step:
            path.unlink(missing_ok=True)
            ckpt.manifest_path(path).unlink(missing_ok=True)
