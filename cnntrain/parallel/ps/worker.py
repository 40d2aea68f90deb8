"""``--role chief`` and ``--role worker``: pull the weights, compute a gradient on this worker's own
shard of the training set, push it, and go on without waiting for the others.

    cnntrain train --strategy async-ps --role worker --worker-index 1 --ps-hosts h:2222 --worker-hosts a,b ...

The step is the synchronous trainer's own (``engine.step.train_step``: same model, loss, precision,
loss scaling, gradient accumulation, clipping, skip of non-finite steps); only the update differs:
``PsWorker.apply_update`` pushes the gradient and pulls new weights, the optimizer runs on the ps.
Worker ``i`` of ``W`` reads the fixed ``shard_indices(N, W, i)`` slice of the training set,
reshuffled each pass with seed ``--seed + i``; one epoch of the job is N / (batch x accum-steps)
updates, whichever workers made them. The chief is worker 0 and does the bookkeeping as well
(``chief.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from cnntrain.config import TrainConfig
from cnntrain.data.balance import loss_weights
from cnntrain.data.loaders import build_loaders
from cnntrain.data.pipeline import BatchPlan
from cnntrain.engine.precision import LossScaler
from cnntrain.engine.run import Result
from cnntrain.engine.step import StepParts, Update, make_loss_fn, train_step
from cnntrain.engine.trainer import load_model_and_data
from cnntrain.errors import ConfigError, NumericalError
from cnntrain.hardware import usable_cores, with_resolved_precision
from cnntrain.parallel.base import Strategy
from cnntrain.parallel.env import LaunchEnv
from cnntrain.parallel.ps.chief import Chief
from cnntrain.parallel.ps.client import PsClient, run_finished
from cnntrain.parallel.ps.cluster import CHIEF, WORKER, Cluster, ShardPlan, role_name, shard_indices
from cnntrain.parallel.ps.transport import GaveUp

log = logging.getLogger("cnntrain")


class PsWorker(Strategy):
    """The strategy of an async-ps worker: the update is a push of this step's gradient (or of
    "skipped") and a pull of the newest weights; the optimizer runs on the ps."""

    name = "async-ps"

    def __init__(self, cfg: TrainConfig, client: PsClient) -> None:
        super().__init__(cfg, LaunchEnv())
        self.client = client
        self.done, self.version = False, 0

    def setup(self) -> None:
        torch.set_num_threads(self.cfg.threads or usable_cores())

    def pull(self) -> None:
        self.done, self.version = self.client.pull()

    def apply_update(self, update: Update | None, grads_ok: bool, lr: float) -> None:
        self.done, self.version = self.client.push_pull(skipped=not grads_ok)


def steps_per_epoch(cfg: TrainConfig, size: int) -> int:
    """Updates in one pass over ``size`` images at ``--batch-size`` x ``--accum-steps`` (as one
    synchronous process)."""
    batches = len(BatchPlan(size, cfg.batch_size, device=torch.device("cpu"), mean=(0.0,), std=(1.0,), shuffle=True,
                            drop_last=cfg.drop_last))
    return max(batches // cfg.accum_steps, 1)


def run_trainer(cfg: TrainConfig, cluster: Cluster) -> Result | None:
    """Train as the chief (returns the run's Result) or as a worker (returns None) until the job ends."""
    index = 0 if cfg.role == "chief" else cfg.worker_index
    me = role_name(CHIEF if index == 0 else WORKER, index, cluster)
    client = PsClient(cfg, cluster, CHIEF if index == 0 else WORKER, index)
    strategy = PsWorker(cfg, client)
    strategy.setup()
    try:  # first, so the ps know the chief is alive while it loads the data
        client.connect(stop=run_finished(cfg) if index else None)
    except GaveUp:
        log.info("%s: training finished before this worker could join", me)
        return None
    finished = False
    try:
        # The client's HELLO keeps the options as given (every role has "auto"); the step gets this
        # machine's precision, and the chief stores that one in its checkpoints.
        result = _train(with_resolved_precision(cfg, strategy.device), cluster, strategy, index, me)
        finished = True
        return result
    finally:
        client.close(goodbye=finished)  # no goodbye after a failure: the ps then report this process lost


def _train(cfg: TrainConfig, cluster: Cluster, strategy: PsWorker, index: int, me: str) -> Result | None:
    device, client = strategy.device, strategy.client
    data, model = load_model_and_data(cfg, device)
    plan = ShardPlan.for_model(model, cluster.num_ps)
    client.bind(model, plan)
    shard = shard_indices(len(data.train), cluster.num_workers, index, cfg.seed)
    own = dataclasses.replace(data, train=data.train.subset(shard), val=None)
    loader, _ = build_loaders(cfg.replace(seed=cfg.seed + index), own, device)
    updates_per_pass = len(loader) // cfg.accum_steps
    if updates_per_pass == 0:
        raise ConfigError(f"{me}: --batch-size {cfg.batch_size} x --accum-steps {cfg.accum_steps} is larger than its "
                          f"shard of {len(shard)} of the {len(data.train)} training images: lower --batch-size or "
                          f"use fewer workers")
    per_epoch = steps_per_epoch(cfg, len(data.train))
    total = round(cfg.epochs * per_epoch) if cfg.epochs > 0 else cfg.max_steps
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    scaler = LossScaler.for_precision(cfg.precision, cfg.loss_scale)
    chief = Chief(cfg, cluster, client, data, model, plan, device, per_epoch, total, scaler) if index == 0 else None
    if chief is not None:
        chief.start()
    log.info("%s: shard of %d images (%d updates of %d x %d per pass), %s", me, len(shard), updates_per_pass,
             cfg.batch_size, cfg.accum_steps, device)
    params = [p for p in model.parameters() if p.requires_grad]
    # --class-weights from the whole training set's counts, not this worker's shard
    loss_fn = make_loss_fn(cfg.label_smoothing, loss_weights(cfg.class_weights, data.train, device))
    parts = StepParts(torch.compile(model) if cfg.compile else model, params, loss_fn,
                      scaler, strategy, None, cfg.precision, cfg.accum_steps, cfg.grad_clip)
    try:
        started, computed = time.perf_counter(), _run(parts, loader, updates_per_pass, strategy, chief, me)
        seconds = time.perf_counter() - started
        log.info("%s: training over at update %d; computed %d gradients in %.1f s (%.2f/s)", me, strategy.version,
                 computed, seconds, computed / max(seconds, 1e-9))
        return chief.finish() if chief is not None else None
    finally:
        if chief is not None:
            chief.lock.release()  # also when training failed: the run folder is free again


def _run(parts: StepParts, loader, updates_per_pass: int, strategy: PsWorker, chief: Chief | None, me: str) -> int:
    """Steps until the ps say the run is over; the number of gradients this worker computed."""
    computed = bad_run = epoch = 0
    strategy.pull()
    parts.forward.train()
    while not strategy.done:
        batches = loader.iterate(epoch)
        for _ in range(updates_per_pass):
            outcome = train_step(parts, batches, 0.0, strategy.version)  # the LR is the ps's
            computed += int(outcome.grads_ok)
            bad_run = 0 if outcome.loss_ok else bad_run + 1
            if bad_run >= parts.strategy.cfg.max_bad_steps:
                raise NumericalError(f"{me}: loss was not finite for {bad_run} steps in a row (update "
                                     f"{strategy.version}); lower --lr, add --grad-clip or --warmup-epochs, or use "
                                     f"bf16/fp32")
            if chief is not None and outcome.loss_ok:
                chief.after_step(strategy.version, outcome)
            if strategy.done:
                break
        epoch += 1
    return computed
