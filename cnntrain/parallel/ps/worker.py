"""``--role chief`` and ``--role worker``: pull the weights, compute a gradient on this worker's own
shard of the training set, push it, and go on without waiting for the others.

    cnntrain train --strategy async-ps --role worker --worker-index 1 --ps-hosts h:2222 --worker-hosts a,b ...

The step is the synchronous trainer's (same model, loss, precision, loss scaling, clipping, skip of
non-finite steps); only the optimizer step is elsewhere, on the ps. Worker ``i`` of ``W`` reads
the fixed ``shard_indices(N, W, i)`` slice of the training set, reshuffled each pass with seed
``--seed + i``; one epoch of the job is N / batch updates, whichever workers made them. The chief
is worker 0 and does the bookkeeping as well (``chief.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from cnntrain.config import TrainConfig
from cnntrain.data.datasets import load_data
from cnntrain.data.loaders import build_loaders
from cnntrain.data.pipeline import BatchPlan
from cnntrain.engine.evaluate import main_logits
from cnntrain.engine.precision import LossScaler, autocast
from cnntrain.engine.trainer import Result, _loss_fn, build_model
from cnntrain.errors import ConfigError, NumericalError
from cnntrain.parallel.env import usable_cores
from cnntrain.parallel.ps.chief import Chief
from cnntrain.parallel.ps.client import PsClient, run_finished
from cnntrain.parallel.ps.cluster import CHIEF, WORKER, Cluster, ShardPlan, role_name, shard_indices
from cnntrain.parallel.ps.transport import GaveUp
from cnntrain.parallel.strategy import pick_device

log = logging.getLogger("cnntrain")


def steps_per_epoch(cfg: TrainConfig, size: int) -> int:
    """Updates in one pass over ``size`` images at ``--batch-size`` (as one synchronous process)."""
    return len(BatchPlan(size, cfg.batch_size, device=torch.device("cpu"), mean=(0.0,), std=(1.0,), shuffle=True,
                         drop_last=cfg.drop_last))


def run_trainer(cfg: TrainConfig, cluster: Cluster) -> Result | None:
    """Train as the chief (returns the run's Result) or as a worker (returns None) until the job ends."""
    index = 0 if cfg.role == "chief" else cfg.worker_index
    role = CHIEF if index == 0 else WORKER
    me = role_name(role, index, cluster)
    device = pick_device(cfg.device)
    torch.set_num_threads(cfg.threads or usable_cores())
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    client = PsClient(cfg, cluster, role, index)
    try:  # first, so the ps know the chief is alive while it loads the data
        client.connect(stop=run_finished(cfg) if index else None)
    except GaveUp:
        log.info("%s: training finished before this worker could join", me)
        return None
    finished = False
    try:
        result = _train(cfg, cluster, client, index, device, me)
        finished = True
        return result
    finally:
        client.close(goodbye=finished)  # no goodbye after a failure: the ps then report this process lost


def _train(cfg: TrainConfig, cluster: Cluster, client: PsClient, index: int, device: torch.device,
           me: str) -> Result | None:
    data = load_data(cfg)
    model = build_model(cfg, data).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    plan = ShardPlan.for_model(model, cluster.num_ps)
    client.bind(model, plan)
    shard = shard_indices(len(data.train), cluster.num_workers, index, cfg.seed)
    own = dataclasses.replace(data, train=data.train.subset(shard), val=None)
    loader, _ = build_loaders(dataclasses.replace(cfg, seed=cfg.seed + index), own, device)
    if len(loader) == 0:
        raise ConfigError(f"{me}: --batch-size {cfg.batch_size} is larger than its shard of {len(shard)} of the "
                          f"{len(data.train)} training images: lower --batch-size or use fewer workers")
    per_epoch = steps_per_epoch(cfg, len(data.train))
    total = round(cfg.epochs * per_epoch) if cfg.epochs > 0 else cfg.max_steps
    if cfg.max_steps:
        total = min(total, cfg.max_steps)

    chief = Chief(cfg, cluster, client, data, model, plan, device, per_epoch, total) if index == 0 else None
    if chief is not None:
        chief.start()
    log.info("%s: shard of %d images (%d batches of %d per pass), %s", me, len(shard), len(loader), cfg.batch_size,
             device)
    wrapped = torch.compile(model) if cfg.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = _loss_fn(cfg)
    scaler = LossScaler.for_precision(cfg.precision, cfg.loss_scale)
    started = time.perf_counter()
    computed = bad_run = epoch = 0
    done, version = client.pull()
    model.train()
    while not done:
        for images, labels in loader.iterate(epoch):
            with autocast(cfg.precision, device.type):
                output = wrapped(images)
                loss = loss_fn(output, labels)
            scaler.scale_loss(loss).backward()
            grads = [p.grad for p in params if p.grad is not None]
            scaler.unscale_(grads)
            grad_norm = torch.nn.utils.get_total_norm(grads)
            loss_ok, grads_ok = torch.stack([loss.detach().float(), grad_norm.float()]).isfinite().tolist()
            if grads_ok and cfg.grad_clip:
                torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, grad_norm)
            done, version = client.push_pull(skipped=not grads_ok)
            scaler.update(found_inf=not grads_ok)
            for p in params:
                p.grad = None
            computed += int(grads_ok)
            bad_run = 0 if loss_ok else bad_run + 1
            if bad_run >= cfg.max_bad_steps:
                raise NumericalError(f"{me}: loss was not finite for {bad_run} steps in a row (update {version}); "
                                     f"lower --lr, add --grad-clip or --warmup-epochs, or use bf16/fp32")
            if chief is not None and loss_ok:
                chief.after_step(version, loss, main_logits(output).float(), labels,
                                 grad_norm if grads_ok else grad_norm * 0, scaler)
            if done:
                break
        epoch += 1
    seconds = time.perf_counter() - started
    log.info("%s: training over at update %d; computed %d gradients in %.1f s (%.2f/s)", me, version, computed,
             seconds, computed / max(seconds, 1e-9))
    if chief is not None:
        return chief.finish(scaler)
    return None
