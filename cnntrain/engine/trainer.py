"""The training loop, readable top to bottom.

    cnntrain train --dataset cifar10 --model resnet20 --epochs 5
    cnntrain train --dataset mnist --model lenet --epochs 2 --precision bf16
    torchrun --standalone --nproc-per-node 2 -m cnntrain train --dataset synthetic --max-steps 50

``train(cfg)`` builds the strategy, data, model and optimizer, restores a checkpoint when asked,
then runs steps. The learning rate is a pure function of the step and the data order a pure
function of (seed, epoch), so the state saved in a checkpoint (weights, optimizer, scaler, EMA,
RNG, step, partial metrics) is all a resumed run needs to continue exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from cnntrain.config import TrainConfig, config_from_dict, save_config
from cnntrain.data.datasets import DataBundle, load_data
from cnntrain.data.loaders import build_loaders
from cnntrain.engine import checkpoint as ckpt
from cnntrain.engine.evaluate import EvalResult, evaluate, main_logits
from cnntrain.engine.larc import apply_larc
from cnntrain.engine.lookahead import Lookahead
from cnntrain.engine.metrics import MetricsLog, TrainWindow, write_summary
from cnntrain.engine.optim import build_optimizer, lr_at, set_lr
from cnntrain.engine.plots import plot_curves
from cnntrain.engine.precision import LossScaler, autocast
from cnntrain.engine.profile import make_profiler
from cnntrain.engine.progress import TABLE_HEADER, Progress, setup_logging, table_row
from cnntrain.engine.run import export_safetensors, peak_memory_mb, resolve_run_dir, unwrap
from cnntrain.errors import ConfigError, NumericalError
from cnntrain.models import count_parameters, get_spec
from cnntrain.models.registry import create_model_for
from cnntrain.parallel.strategy import Strategy, make_strategy

log = logging.getLogger("cnntrain")


@dataclass
class Result:
    run_dir: Path
    best_top1: float
    final_top1: float
    steps: int
    seconds: float
    img_per_s: float
    summary: dict


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


def _loss_fn(cfg: TrainConfig):
    ce = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def loss(output, labels):
        if isinstance(output, torch.Tensor):
            return ce(output, labels)
        # Auxiliary heads weighted as their papers' training code: GoogLeNet 2 x 0.3, Inception v3 0.4.
        main, *aux = [o for o in output if o is not None]
        weight = 0.3 if len(aux) > 1 else 0.4
        return ce(main, labels) + sum(weight * ce(a, labels) for a in aux)

    return loss


def train(cfg: TrainConfig, strategy: Strategy | None = None) -> Result:
    """Train as ``cfg`` says; returns the run folder and headline figures."""
    setup_logging()
    strategy = strategy or make_strategy(cfg)
    strategy.setup()
    try:
        with strategy.guard():  # a failed collective becomes a DistributedError naming rank and op
            return _train(cfg, strategy)
    finally:
        strategy.teardown()


def _agree_on_time(strategy: Strategy) -> int:
    stamp = torch.tensor([int(time.time())], dtype=torch.int64, device=strategy.device)
    if strategy.world_size > 1:
        # Rank 0's clock names the run folder for everyone.
        stamp = strategy.broadcast_from_main(stamp)
    return int(stamp.item())


def _train(cfg: TrainConfig, strategy: Strategy) -> Result:
    main = strategy.is_main
    if not main:
        log.setLevel(logging.WARNING)
    device = strategy.device
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    # Every rank loads; the parsers let local rank 0 download while the others wait.
    data = load_data(cfg)
    model = build_model(cfg, data).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    run_dir = resolve_run_dir(cfg, _agree_on_time(strategy))
    if main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    meta = {"model": cfg.model, "num_classes": data.num_classes, "classes": data.classes,
            "input_shape": list(data.shape), "mean": list(data.mean), "std": list(data.std),
            "config": cfg.to_dict()}
    world = strategy.world_size
    accum = cfg.accum_steps
    global_batch = cfg.batch_size * world * accum
    base_lr = cfg.lr * (global_batch / cfg.scale_lr if cfg.scale_lr else 1.0)
    optimizer = build_optimizer(model, cfg, device.type)
    scaler = LossScaler.for_precision(cfg.precision, cfg.loss_scale)
    ema = None
    if cfg.ema_decay:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)

    train_loader, val_loader = build_loaders(cfg, data, device, strategy.rank, world)
    # An optimizer step takes --accum-steps micro-batches; an epoch's leftover micro-batches are skipped.
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch == 0 or global_batch > len(data.train):
        raise ConfigError(f"--batch-size {cfg.batch_size} x {world} processes x {accum} accumulation steps is "
                          f"larger than the {len(data.train)} training images: lower --batch-size")
    total_steps = round(cfg.epochs * steps_per_epoch) if cfg.epochs > 0 else cfg.max_steps
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    step, best_top1, elapsed_before = 0, 0.0, 0.0
    window = TrainWindow(device)
    resume_path = ckpt.resolve_resume(cfg.resume, run_dir)
    if resume_path is None and hasattr(model, "init_from_data"):
        # Data-dependent initialisation (fastnet's patch whitening), identical on every rank.
        sample = data.train.images[:5000].to(device, torch.float32) / 255
        mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
        model.init_from_data((sample - mean) / std)
    if resume_path is not None:
        state = ckpt.load_checkpoint(resume_path)
        _check_global_batch(state, resume_path, global_batch, cfg, world)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        window.load(state["window"], with_sums=main)  # the saved sums are every rank's: rank 0 carries them
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        step, best_top1, elapsed_before = state["step"], state["best_top1"], state["elapsed"]
        _warn_config_changes(config_from_dict(state["config"]), cfg)
        log.info("resumed from %s at step %d (epoch %.2f)", resume_path, step, step / steps_per_epoch)
    lookahead = Lookahead(unwrap(model), cfg.lookahead, cfg.lookahead_alpha, total_steps) if cfg.lookahead else None
    if lookahead is not None and resume_path is not None and "lookahead" in state:
        lookahead.load_state_dict(state["lookahead"])

    metrics = None
    if main:
        metrics = MetricsLog(run_dir / "metrics.csv", resume_step=step if resume_path else None,
                             tensorboard_dir=run_dir / "tb" if cfg.tensorboard else None)
        if cfg.tensorboard:
            sample, _ = next(train_loader.iterate(step // steps_per_epoch))
            metrics.add_images("train/augmented_samples", sample[:16].float().cpu(), step)
    wrapped = strategy.wrap_model(model)
    if resume_path is not None:
        strategy.load_state_dict(state.get("strategy", {}))
    if cfg.compile:
        compile_started = time.perf_counter()
        wrapped = torch.compile(wrapped)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = _loss_fn(cfg)
    eval_model = ema if ema is not None else wrapped

    if main:
        log.info("%s: %s, %d parameters | %s: %d train, %d %s images, %d classes | batch %d x %d%s = %d, "
                 "lr %g, %d steps/epoch, %d steps | %s %s | %s", run_dir, cfg.model, count_parameters(model),
                 cfg.dataset, len(data.train), len(data.val) if data.val else 0, data.val_name,
                 data.num_classes, cfg.batch_size, world, f" x {accum} accumulated" if accum > 1 else "",
                 global_batch, base_lr, steps_per_epoch, total_steps,
                 device, cfg.precision, "resumed" if resume_path else "new run")
    progress = Progress(cfg.progress, total_steps, step, main)
    prof = make_profiler(cfg.profile if main else "none", run_dir / "profile", device, total_steps - step)
    if main:
        progress.write(TABLE_HEADER)

    started = time.perf_counter()
    last_save = started
    images_seen = 0
    bad_run = 0
    last_eval: EvalResult | None = None
    last_train = (float("nan"), float("nan"))
    compile_seconds = None
    save_due = False  # several ranks: --save-interval has passed on rank 0 (agreed at the last log line)

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - started

    def save(best: bool = False) -> None:
        nonlocal last_save, save_due
        strategy.synchronize()  # --partial-update: one model, the same on every rank
        window_state = window.state(strategy.all_reduce_sum if world > 1 else None)
        strategy_state = strategy.state_dict()
        if main:
            state = {
                "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "window": window_state, "step": step,
                "best_top1": best_top1, "elapsed": elapsed(), "config": cfg.to_dict(), "meta": meta,
                "global_batch": global_batch, "world_size": world,
                "rng": {"torch": torch.get_rng_state(),
                        **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})},
            }
            if ema is not None:
                state["ema"] = ema.state_dict()
            if lookahead is not None:
                state["lookahead"] = lookahead.state_dict()
            if strategy_state:
                state["strategy"] = strategy_state
            ckpt.save_checkpoint(state, run_dir / "checkpoints", step, keep_last=cfg.keep_last, best=best)
        last_save = time.perf_counter()
        save_due = False

    def run_eval() -> None:
        nonlocal best_top1, last_eval
        if val_loader is None:
            return
        strategy.synchronize()
        result = evaluate(eval_model, val_loader.iterate(0), data.num_classes, precision=cfg.precision,
                          device=device, tta_flip=cfg.tta_flip, tta_translate=cfg.tta_translate,
                          all_reduce=strategy.all_reduce_sum if world > 1 else None)
        last_eval = result
        is_best = result.top1 > best_top1
        best_top1 = max(best_top1, result.top1)
        if main:
            metrics.write(step=step, epoch=step / steps_per_epoch, split=data.val_name, loss=result.loss,
                          top1_err=result.top1_err, top5_err=result.top5_err, lr=current_lr,
                          elapsed_s=elapsed())
            rate = images_seen / max(time.perf_counter() - started, 1e-9)
            progress.write(table_row(step / steps_per_epoch, step, last_train[0], last_train[1], result.loss,
                                     result.top1_err, result.top5_err, current_lr, rate, elapsed()))
            plot_curves(run_dir / "metrics.csv", run_dir / "plots" / "curves.png",
                        f"{cfg.dataset} / {cfg.model}")
        return is_best

    def log_window() -> None:
        nonlocal last_train, save_due
        if world > 1:
            # Rank 0's clock decides --save-interval for everyone (save() is a collective), riding
            # on the all-reduce the log line needs anyway.
            due = float(main and bool(cfg.save_interval) and time.perf_counter() - last_save >= cfg.save_interval)
            sums = strategy.all_reduce_sum(torch.cat([window.sums, window.sums.new_tensor([due])]))
            save_due = bool(sums[3] > 0)
            sums = sums[:3]
        else:
            sums = window.sums
        loss_sum, correct, count = sums.tolist()
        seconds = max(time.perf_counter() - window.started - window.paused, 1e-9)
        img_s = count / seconds
        last_train = (loss_sum / max(count, 1), 1 - correct / max(count, 1))
        grad_norm = float(window.grad_norm) / max(window.steps, 1)
        if main:
            metrics.write(step=step, epoch=step / steps_per_epoch, split="train", loss=last_train[0],
                          top1_err=last_train[1], top5_err="", lr=current_lr, img_per_s=img_s,
                          elapsed_s=elapsed(), loss_scale=scaler.scale, grad_norm=grad_norm)
            progress.report(step, step / steps_per_epoch, last_train[0], last_train[1], current_lr, img_s,
                            window.data_seconds / seconds)
        window.sums.zero_()
        window.grad_norm.zero_()
        window.steps = 0
        window.data_seconds = 0.0
        window.paused = 0.0
        window.started = time.perf_counter()

    current_lr = lr_at(step, cfg, base_lr, steps_per_epoch, total_steps)
    model.train()
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        batches = train_loader.iterate(epoch, in_epoch * accum)  # the loader counts micro-batches
        for _ in range(in_epoch, steps_per_epoch):
            if step >= total_steps:
                break
            current_lr = lr_at(step, cfg, base_lr, steps_per_epoch, total_steps)
            set_lr(optimizer, current_lr, step / steps_per_epoch)
            seen = []  # (loss, logits, labels) of each micro-batch, added to the window once known finite
            for micro in range(accum):
                t0 = time.perf_counter()
                with prof.phase("data"):
                    images, labels = next(batches)
                window.data_seconds += time.perf_counter() - t0
                # Gradients of all but the last micro-batch stay local (DDP's no_sync).
                with strategy.accumulating(micro < accum - 1):
                    with prof.phase("forward"), autocast(cfg.precision, device.type):
                        output = wrapped(images)
                        loss = loss_fn(output, labels)
                    with prof.phase("backward"):
                        scaler.scale_loss(loss / accum if accum > 1 else loss).backward()
                seen.append((loss.detach(), main_logits(output).detach().float(), labels))
            loss = torch.stack([item[0] for item in seen]).sum() if accum > 1 else seen[0][0]
            with prof.phase("communication"):
                strategy.after_backward(params)
            with prof.phase("optimizer"):
                grads = [p.grad for p in params if p.grad is not None]
                scaler.unscale_(grads)
                grad_norm = torch.nn.utils.get_total_norm(grads)
                # The one host sync per step: skip the update when anything is not finite.
                loss_ok, grads_ok = torch.stack([loss.float(), grad_norm.float()]).isfinite().tolist()
                if grads_ok:
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, grad_norm)
                    if cfg.larc_mode != "none":
                        apply_larc(optimizer, current_lr, cfg.larc_mode, cfg.larc_eta, cfg.larc_eps)
                    optimizer.step()
                    if ema is not None:
                        ema.update_parameters(model)
                scaler.update(found_inf=not grads_ok)
                optimizer.zero_grad(set_to_none=True)
            with prof.phase("communication"):
                strategy.after_step(step)  # --partial-update averages a parameter chunk here
            prof.step()
            if compile_seconds is None and cfg.compile:
                compile_seconds = time.perf_counter() - compile_started
                log.info("torch.compile warm-up (first step): %.1f s", compile_seconds)
            bad_run = 0 if loss_ok else bad_run + 1
            if bad_run >= cfg.max_bad_steps:
                last_good = ckpt.latest_valid(run_dir / "checkpoints", quiet=True)
                raise NumericalError(
                    f"loss was not finite for {bad_run} steps in a row (step {step + 1}); last good checkpoint: "
                    f"{last_good or 'none'}; lower --lr, add --grad-clip or --warmup-epochs, or use bf16/fp32")
            if loss_ok:
                for micro_loss, logits, micro_labels in seen:
                    window.add(micro_loss, logits, micro_labels)
                window.add_step(grad_norm if grads_ok else grad_norm * 0)
            step += 1
            if lookahead is not None:
                lookahead.after_step(step)
            images_seen += sum(item[2].shape[0] for item in seen) * world
            progress.step(step)
            epoch_end = step % steps_per_epoch == 0 or step == total_steps
            if step % cfg.display_every == 0 or (epoch_end and window.steps):
                log_window()
            is_best = False
            pause_started = time.perf_counter()
            if (cfg.eval_every and step % cfg.eval_every == 0) or (epoch_end and not cfg.eval_every) \
                    or step == total_steps:
                is_best = bool(run_eval())
            timed = save_due if world > 1 else \
                cfg.save_interval and time.perf_counter() - last_save >= cfg.save_interval
            if (cfg.save_every and step % cfg.save_every == 0) or (epoch_end and not cfg.save_every) \
                    or step == total_steps or timed or is_best:
                save(best=is_best)
            window.paused += time.perf_counter() - pause_started
    progress.close()
    profiled = prof.finish()
    if metrics is not None:
        metrics.close()

    seconds = time.perf_counter() - started
    summary = {
        "run_dir": str(run_dir), "dataset": cfg.dataset, "model": cfg.model,
        "parameters": count_parameters(model), "steps": step, "epochs": step / steps_per_epoch,
        "global_batch": global_batch, "world_size": world, "device": str(device), "precision": cfg.precision,
        "best_top1": best_top1, "final_top1": last_eval.top1 if last_eval else None,
        "final_top5": last_eval.top5 if last_eval else None, "final_loss": last_eval.loss if last_eval else None,
        "eval_split": data.val_name, "eval_images": last_eval.count if last_eval else 0,
        "train_seconds": seconds, "total_seconds": elapsed(), "img_per_s": images_seen / max(seconds, 1e-9),
        "skipped_steps": scaler.skipped, "loss_scale": scaler.scale, "compile_seconds": compile_seconds,
        "peak_memory_mb": peak_memory_mb(device), **strategy.comm_stats(), **profiled,
    }
    if main:
        export_safetensors(ema if ema is not None else model, run_dir / "model.safetensors", meta)
        write_summary(run_dir / "summary.json", summary)
        if "comm_bytes_per_step" in summary:
            log.info("exchange per step and rank: %.1f kB sent vs %.1f kB dense fp32 (%.1fx less)",
                     summary["comm_bytes_per_step"] / 1e3, summary["dense_bytes_per_step"] / 1e3,
                     summary["compression"])
        log.info("done: %d steps in %.1f s (%.1f img/s); %s top-1 %.2f%% (best %.2f%%); %s", step, seconds,
                 summary["img_per_s"], data.val_name, 100 * (summary["final_top1"] or 0), 100 * best_top1,
                 run_dir)
    return Result(run_dir, best_top1, summary["final_top1"] or 0.0, step, seconds, summary["img_per_s"], summary)


def _check_global_batch(state: dict, path: Path, global_batch: int, cfg: TrainConfig, world: int) -> None:
    """Steps, the data order and the LR schedule are counted in global batches: a resumed run must
    keep the checkpoint's, whatever its number of processes (``--accum-steps`` makes up the rest)."""
    saved = state.get("global_batch")
    if saved is None or saved == global_batch:
        if saved is not None and state.get("world_size") != world:
            log.warning("resuming on %d processes (the checkpoint was written by %d) with the same global batch %d: "
                        "the same images per step, but not bit for bit (augmentation draws are per process)",
                        world, state.get("world_size"), global_batch)
        return
    raise ConfigError(
        f"{path}: written with a global batch of {saved} ({state.get('world_size', '?')} processes), but this run's "
        f"is {global_batch} ({cfg.batch_size} x {world} processes x {cfg.accum_steps} accumulated). Resume with the "
        f"same global batch: change --batch-size or --accum-steps so that batch x processes x accum-steps = {saved}")


def _warn_config_changes(saved: TrainConfig, now: TrainConfig) -> None:
    ignore = {"resume", "run_dir", "epochs", "max_steps", "display_every", "progress", "save_every",
              "save_interval", "eval_every", "keep_last", "data_dir", "threads", "download", "verify",
              "workers", "pipeline", "tensorboard", "dist_timeout", "profile"}
    changed = [f.name for f in dataclasses.fields(TrainConfig)
               if f.name not in ignore and getattr(saved, f.name) != getattr(now, f.name)]
    if changed:
        log.warning("resuming with changed options (%s): the result will differ from an uninterrupted run",
                    ", ".join(changed))
