"""Synchronous training: build everything a run needs, then hand it to the loop.

    cnntrain train --dataset cifar10 --model resnet20 --epochs 5
    cnntrain train --dataset mnist --model lenet --epochs 2 --precision bf16
    torchrun --standalone --nproc-per-node 2 -m cnntrain train --dataset synthetic --max-steps 50

``train(cfg, strategy)`` loads the data and the model, builds the optimizer and the state, restores
a checkpoint when asked, runs ``engine.loop.TrainLoop`` and writes the final weights and summary.
The learning rate is a pure function of the step and the data order a pure function of (seed,
epoch), so what ``TrainState`` saves is all a resumed run needs to continue exactly. The strategy
(``cnntrain/parallel``) is given by the caller: the engine knows nothing about how processes talk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn

from cnntrain.config import TrainConfig, config_from_dict, save_config
from cnntrain.data.balance import imbalance_note, loss_weights
from cnntrain.data.datasets import DataBundle, load_data
from cnntrain.data.loaders import build_loaders
from cnntrain.engine import checkpoint as ckpt
from cnntrain.engine import finetune
from cnntrain.engine.callbacks import Callback, CallbackList, default_callbacks, load_callbacks
from cnntrain.engine.eval_report import config_callbacks
from cnntrain.engine.lookahead import Lookahead
from cnntrain.engine.loop import Cadence, TrainLoop
from cnntrain.engine.metrics import TrainWindow
from cnntrain.engine.optim import build_optimizer, scaled_lr
from cnntrain.engine.precision import LossScaler
from cnntrain.engine.profile import make_profiler
from cnntrain.engine.progress import setup_logging
from cnntrain.engine.run import Result, RunLock, claim_run_dir, finish_run, resolve_run_dir, run_meta
from cnntrain.engine.state import TrainState
from cnntrain.engine.step import LocalUpdate, StepParts, Strategy, make_loss_fn
from cnntrain.engine.trackers import tracker_callbacks
from cnntrain.errors import ConfigError
from cnntrain.hardware import agree_on_precision, peak_memory_mb
from cnntrain.models import count_parameters, get_spec
from cnntrain.models.registry import create_model_for

log = logging.getLogger("cnntrain")


def train(cfg: TrainConfig, strategy: Strategy, callbacks: Iterable[Callback] = ()) -> Result:
    """Train as ``cfg`` says under ``strategy`` (set up and torn down here)."""
    setup_logging()
    strategy.setup()
    try:
        with strategy.guard():  # a failed collective becomes a DistributedError naming rank and op
            # --precision auto becomes what the devices run best: the run, config.yaml and its
            # checkpoints only ever see fp32 / fp16 / bf16.
            cfg = agree_on_precision(cfg, strategy)
            extensions = [*default_callbacks(), *config_callbacks(cfg), *load_callbacks(cfg.callbacks), *callbacks,
                          *tracker_callbacks(cfg)]
            loop = build_loop(cfg, strategy, extensions)
            try:
                loop.run()
                return finish(loop)
            finally:
                if loop.lock is not None:
                    loop.lock.release()
    finally:
        strategy.teardown()


def build_model(cfg: TrainConfig, data: DataBundle) -> nn.Module:
    """The configured model for ``data``, checked against one image so a size mismatch is clear."""
    model = create_model_for(cfg.model, data.num_classes, data.shape, **cfg.model_kwargs)
    probe = torch.zeros((2, *data.shape))
    try:
        with torch.no_grad():
            model.eval()(probe)
    except RuntimeError as exc:
        want = get_spec(cfg.model).input_size
        raise ConfigError(f"model {cfg.model!r} (designed for input {want}) cannot take images of shape "
                          f"{data.shape} from --dataset {cfg.dataset}: {str(exc).splitlines()[0]}; "
                          f"pick another --model or resize with --image-size") from None
    return model.train()


def load_model_and_data(cfg: TrainConfig, device: torch.device) -> tuple[DataBundle, nn.Module]:
    """The data set (every rank loads; local rank 0 downloads while the others wait) and the model
    on ``device``, seeded by ``--seed``."""
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    prep = finetune.run_preprocessing(cfg)  # pretrained weights: their normalisation and crop size
    size = get_spec(cfg.model).input_size
    data = load_data(cfg, input_size=(size[0], prep.crop_size, prep.crop_size) if prep else size)
    data = finetune.with_preprocessing(data, prep)
    model = build_model(cfg, data).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return data, model


def init_from_data(model: nn.Module, data: DataBundle, device: torch.device) -> None:
    """Data-dependent initialisation (fastnet's patch whitening), identical on every rank."""
    if not hasattr(model, "init_from_data"):
        return
    sample = data.train.images[:5000].to(device, torch.float32) / 255
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    model.init_from_data((sample - mean) / std)


def build_loop(cfg: TrainConfig, strategy: Strategy, callbacks: list[Callback]) -> TrainLoop:
    """Everything a run needs, restored from a checkpoint when resuming, as a ``TrainLoop``."""
    data, model = load_model_and_data(cfg, strategy.device)
    run_dir = resolve_run_dir(cfg, _agree_on_time(strategy))
    lock = _claim(cfg, strategy, run_dir)
    try:
        return _build_loop(cfg, strategy, callbacks, data, model, run_dir, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _claim(cfg: TrainConfig, strategy: Strategy, run_dir: Path) -> RunLock | None:
    """Rank 0 locks the run folder (refusing a used one unless resuming or --overwrite) and tells
    the other ranks whether it could, so that a refusal ends every rank at once."""
    lock, refused = None, None
    if strategy.is_main:
        try:
            lock = claim_run_dir(run_dir, resuming=bool(cfg.resume), overwrite=cfg.overwrite)
        except ConfigError as exc:
            refused = exc
    if strategy.world_size > 1:
        ok = strategy.broadcast_from_main(torch.tensor([refused is None], dtype=torch.int64, device=strategy.device))
        if not ok.item() and refused is None:
            raise ConfigError(f"rank 0 could not claim the run folder {run_dir}: see its error")
    if refused is not None:
        raise refused
    return lock


def _build_loop(cfg: TrainConfig, strategy: Strategy, callbacks: list[Callback], data: DataBundle,
                model: nn.Module, run_dir: Path, lock: RunLock | None) -> TrainLoop:
    device, world, accum = strategy.device, strategy.world_size, cfg.accum_steps
    train_loader, val_loader = build_loaders(cfg, data, device, strategy.rank, world,
                                             local_world_size=strategy.local_world_size)
    # An optimizer step takes --accum-steps micro-batches; an epoch's leftover micro-batches are skipped.
    steps_per_epoch, global_batch = len(train_loader) // accum, cfg.batch_size * world * accum
    if steps_per_epoch == 0 or global_batch > len(data.train):
        raise ConfigError(f"--batch-size {cfg.batch_size} x {world} processes x {accum} accumulation steps is "
                          f"larger than the {len(data.train)} training images: lower --batch-size")
    total_steps = round(cfg.epochs * steps_per_epoch) if cfg.epochs > 0 else cfg.max_steps
    total_steps = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    resume_path, payload = ckpt.resolve_resume(cfg.resume, run_dir), None
    # Pruning touches only this run's checkpoints; a resumed run carries on its predecessor's id.
    run_id = (ckpt.run_id_of(resume_path) if resume_path is not None else None) or ckpt.new_run_id()
    table = None
    if resume_path is None:
        init_from_data(model, data, device)  # before the lookahead copies the weights
        table = finetune.initial_weights(cfg, model)  # --pretrained / --init-from
    state = _new_state(cfg, model, device, total_steps)
    if resume_path is not None:
        payload = _restore(state, resume_path, cfg, global_batch, world, strategy.is_main)
        log.info("resumed from %s at step %d (epoch %.2f)", resume_path, state.step, state.step / steps_per_epoch)
    if strategy.is_main:  # only once the resume is accepted: a refused resume touches nothing
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        finetune.save_table(table, run_dir)
    tuner = finetune.FineTune.for_run(cfg, model, world)  # after the optimizer took every parameter
    callbacks = [*callbacks, tuner] if tuner is not None else callbacks
    wrapped = strategy.wrap_model(model)
    strategy.load_state_dict(state.extra.get("strategy", {}))
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    loss_fn = make_loss_fn(cfg.label_smoothing, loss_weights(cfg.class_weights, data.train, device))
    parts = StepParts(wrapped, [p for p in model.parameters() if p.requires_grad], loss_fn,
                      state.scaler, strategy, LocalUpdate(state.optimizer, model, state.ema, cfg.larc_mode,
                                                          cfg.larc_eta, cfg.larc_eps),
                      cfg.precision, accum, cfg.grad_clip,
                      make_profiler(cfg.profile if strategy.is_main else "none", run_dir / "profile", device,
                                    total_steps - state.step))
    cadence = Cadence(steps_per_epoch, total_steps, cfg.display_every, cfg.eval_every, cfg.save_every,
                      cfg.save_interval)
    loop = TrainLoop(cfg=cfg, data=data, strategy=strategy, state=state, parts=parts, train_loader=train_loader,
                     val_loader=val_loader, eval_model=state.ema if state.ema is not None else wrapped,
                     run_dir=run_dir, cadence=cadence, base_lr=scaled_lr(cfg, global_batch),
                     meta=run_meta(cfg, data), run_facts={"global_batch": global_batch, "world_size": world},
                     resumed=resume_path is not None, callbacks=CallbackList(callbacks), run_id=run_id, lock=lock)
    if payload is not None:
        loop.callbacks.on_load_checkpoint(loop, payload)
    _log_start(loop, model)
    return loop


def _new_state(cfg: TrainConfig, model: nn.Module, device: torch.device, total_steps: int) -> TrainState:
    ema = None
    if cfg.ema_decay:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    lookahead = Lookahead(model, cfg.lookahead, cfg.lookahead_alpha, total_steps) if cfg.lookahead else None
    return TrainState(model, LossScaler.for_precision(cfg.precision, cfg.loss_scale), TrainWindow(device),
                      build_optimizer(model, cfg, device.type), ema, lookahead)


def _restore(state: TrainState, path: Path, cfg: TrainConfig, global_batch: int, world: int, main: bool) -> dict:
    payload = ckpt.load_checkpoint(path)
    _check_global_batch(payload, path, global_batch, cfg, world)
    state.restore(payload, path, with_window_sums=main)  # the saved sums are every rank's: rank 0 carries them
    _warn_config_changes(config_from_dict(payload["config"]), cfg)
    return payload


def _agree_on_time(strategy: Strategy) -> int:
    stamp = torch.tensor([int(time.time())], dtype=torch.int64, device=strategy.device)
    if strategy.world_size > 1:
        stamp = strategy.broadcast_from_main(stamp)  # rank 0's clock names the run folder for everyone
    return int(stamp.item())


def _log_start(loop: TrainLoop, model: nn.Module) -> None:
    cfg, data, world, accum = loop.cfg, loop.data, loop.strategy.world_size, loop.parts.accum
    if loop.is_main:
        log.info("%s: %s, %d parameters | %s: %d train, %d %s images, %d classes | batch %d x %d%s = %d, "
                 "lr %g, %d steps/epoch, %d steps | %s %s | %s", loop.run_dir, cfg.model, count_parameters(model),
                 cfg.dataset, len(data.train), len(data.val) if data.val else 0, data.val_name,
                 data.num_classes, cfg.batch_size, world, f" x {accum} accumulated" if accum > 1 else "",
                 loop.run_facts["global_batch"], loop.base_lr, loop.steps_per_epoch, loop.total_steps,
                 loop.strategy.device, cfg.precision, "resumed" if loop.resumed else "new run")
        note = imbalance_note(data.train.labels, data.classes)
        if note:
            log.info("%s%s", note, "" if cfg.class_weights or cfg.balanced_sampler else
                     " (--class-weights auto or --balanced-sampler may help)")
        note = finetune.describe(cfg, finetune.run_preprocessing(cfg))
        if note:
            log.info("fine-tuning: %s", note)


def finish(loop: TrainLoop) -> Result:
    """The summary, the final weights (the EMA's when there is one) and the Result."""
    seconds = time.perf_counter() - loop.started
    state, cfg, last = loop.state, loop.cfg, loop.last_eval
    summary = {
        "run_dir": str(loop.run_dir), "dataset": cfg.dataset, "model": cfg.model,
        "parameters": count_parameters(state.model), "steps": state.step, "epochs": state.step / loop.steps_per_epoch,
        **loop.run_facts, "device": str(loop.strategy.device), "precision": cfg.precision,
        "best_top1": state.best_top1, "final_top1": last.top1 if last else None,
        "final_top5": last.top5 if last else None, "final_loss": last.loss if last else None,
        "eval_split": loop.data.val_name, "eval_images": last.count if last else 0,
        "train_seconds": seconds, "total_seconds": loop.elapsed(), "img_per_s": loop.images_seen / max(seconds, 1e-9),
        "skipped_steps": state.scaler.skipped, "loss_scale": state.scaler.scale,
        "stopped": loop.stop_reason, "compile_seconds": loop.compile_seconds,
        "peak_memory_mb": peak_memory_mb(loop.strategy.device),
        **loop.strategy.comm_stats(), **loop.parts.profiler.finish(),
    }
    loop.callbacks.on_train_end(loop, summary)
    if loop.is_main:
        finish_run(loop.run_dir, state.ema if state.ema is not None else state.model, loop.meta, summary)
    loop.callbacks.on_run_end(loop, summary)
    if loop.is_main:
        if "comm_bytes_per_step" in summary:
            log.info("exchange per step and rank: %.1f kB sent vs %.1f kB dense fp32 (%.1fx less)",
                     summary["comm_bytes_per_step"] / 1e3, summary["dense_bytes_per_step"] / 1e3,
                     summary["compression"])
        log.info("done: %d steps in %.1f s (%.1f img/s); %s top-1 %.2f%% (best %.2f%%); %s", state.step, seconds,
                 summary["img_per_s"], loop.data.val_name, 100 * (summary["final_top1"] or 0),
                 100 * state.best_top1, loop.run_dir)
    return Result(loop.run_dir, state.best_top1, summary["final_top1"] or 0.0, state.step, seconds,
                  summary["img_per_s"], summary)


def _check_global_batch(payload: dict, path: Path, global_batch: int, cfg: TrainConfig, world: int) -> None:
    """Steps, the data order and the LR schedule are counted in global batches: a resumed run must
    keep the checkpoint's, whatever its number of processes (``--accum-steps`` makes up the rest)."""
    saved = payload.get("global_batch")
    if saved is None or saved == global_batch:
        if saved is not None and payload.get("world_size") != world:
            log.warning("resuming on %d processes (the checkpoint was written by %d) with the same global batch %d: "
                        "the same images per step, but not bit for bit (augmentation draws are per process)",
                        world, payload.get("world_size"), global_batch)
        return
    raise ConfigError(
        f"{path}: written with a global batch of {saved} ({payload.get('world_size', '?')} processes), but this "
        f"run's is {global_batch} ({cfg.batch_size} x {world} processes x {cfg.accum_steps} accumulated). Resume "
        f"with the same global batch: change --batch-size or --accum-steps so that batch x processes x accum-steps "
        f"= {saved}")


# Options a resumed run may change without changing its result.
_RESUME_NEUTRAL = {"resume", "run_dir", "epochs", "max_steps", "display_every", "progress", "save_every",
                   "save_interval", "eval_every", "keep_last", "data_dir", "threads", "download", "verify", "workers",
                   "pipeline", "tensorboard", "dist_timeout", "profile", "callbacks", "overwrite", "cache",
                   "cache_dir", "mlflow", "wandb"}


def _warn_config_changes(saved: TrainConfig, now: TrainConfig) -> None:
    before, after = saved.to_dict(), now.to_dict()
    changed = [k for k in after if k not in _RESUME_NEUTRAL and before.get(k) != after[k]]
    if changed:
        log.warning("resuming with changed options (%s): the result will differ from an uninterrupted run",
                    ", ".join(changed))
