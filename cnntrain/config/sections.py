"""The sections of the training config. Each is frozen and checks its own options when built.

Rules that join two sections (``--loss-scale`` is in ``compute``; ``--partial-update`` with
``--ema-decay`` spans ``sync`` and ``optim``) are checked once more up, in ``TrainConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from cnntrain.config.options import check_choice, flag, option
from cnntrain.errors import ConfigError

DEVICE_ALIASES = {"cudnn": "cuda", "gpu": "cuda"}  # NNabla's -c cudnn; applied while a config is built
DEFAULT_START_PORT = 2222  # cifar-tf's examples start their async-ps cluster there
HOOK_COMPRESSIONS = ("powersgd", "topk", "threshold")  # DDP comm hooks, so only with --overlap


class Section:
    """What every section does once its fields are set: check the allowed values, then its own rules."""

    title: ClassVar[str]  # the heading of its group in ``cnntrain train --help``

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.metadata.get("choices"):
                check_choice(f.name, getattr(self, f.name), f.metadata["choices"])
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the flags of a value or combination this section cannot run."""


def _positive(section: Section, *names: str) -> None:
    for name in names:
        if getattr(section, name) <= 0:
            raise ConfigError(f"{flag(name)} must be positive, got {getattr(section, name)}")


@dataclass(frozen=True)
class DataConfig(Section):
    title: ClassVar[str] = "data"

    dataset: str = option("cifar10", "mnist | fashion-mnist | cifar10 | cifar100 | folder | synthetic | ...")
    data_dir: str = option("data", "folder of the data set's files (--download puts official ones here; image "
                                   "folders and shards: the folder above train/ and val/)")
    download: bool = option(True, "fetch missing official files (always checksum-verified)")
    verify: bool = option(True, "checksum local official files before use")
    max_image_pixels: int = option(178956970, "refuse images with more pixels than this (decompression-bomb guard; "
                                              "0: no limit)")
    val_split: int = option(0, "images held out of the training set for validation (0: use the test split)")
    label_mode: str = option("fine", "CIFAR-100 labels: fine (100) | coarse (20)", choices=("fine", "coarse"))
    image_size: int = option(0, "resize folder images to this square size in pixels (0: keep)")
    synthetic_size: int = option(2048, "synthetic: training images (test split is a quarter of it)")
    synthetic_shape: tuple[int, ...] = option((), "synthetic: image shape as channels, height, width (pixels); "
                                                  "default: the model's input size (with --image-size S: the "
                                                  "model's channels x S x S)")
    synthetic_classes: int = option(10, "synthetic: number of classes")
    augment: str = option("auto", "auto | none | flip | crop-flip | translate-flip",
                          choices=("auto", "none", "flip", "crop-flip", "translate-flip"))
    pad: int = option(4, "pixels of padding for crop / translate augmentation")
    cutout: int = option(0, "side in pixels of the square cut out of each training image (0: off)")
    rotate: float = option(0.0, "in-memory sets: rotate each training image by a random angle in [-R, R] radians "
                                "(NNabla)")
    alternate_flip: bool = option(False, "in-memory sets: mirror each image in every other epoch (random start)")
    drop_last: bool = option(False, "drop the last partial batch of each epoch (fixed shapes for compile)")
    tta_flip: bool = option(False, "evaluate each image and its mirror image, logits averaged")
    tta_translate: int = option(0, "also evaluate the views shifted by this many pixels (0: off)")
    pipeline: str = option("auto", "auto (stream large or mixed-size folders) | memory | stream (DataLoader workers)",
                           choices=("auto", "memory", "stream"))
    workers: int = option(-1, "DataLoader worker processes per rank for streamed data (-1: auto; 0: main process). "
                              "With --strategy async-ps and neither --worker-count nor --worker-hosts: the "
                              "number of training processes, as cifar-tf's --workers (DataLoader workers auto)")
    min_crop_scale: float = option(0.08, "streamed training: smallest crop area (fraction of the image)")
    crop: str = option("random-resized", "streamed training: random-resized | bbox-distort (keeps a tenth of an "
                                         "object box)", choices=("random-resized", "bbox-distort"))
    decode: str = option("host", "streamed sets: host (workers decode) | device (JPEGs decoded on the device: "
                                 "nvJPEG on CUDA)", choices=("host", "device"))
    cache: bool = option(True, "in-memory image folders: keep the decoded images in --cache-dir and reuse them "
                               "while the files are unchanged (--no-cache: decode every run, write nothing)")
    cache_dir: str = option("", "folder of the decoded-image cache (default: $CNNTRAIN_CACHE, else "
                                "~/.cache/cnntrain)")
    balanced_sampler: bool = option(False, "draw each epoch's training images with replacement, every class equally "
                                           "likely (imbalanced sets)")

    # Augmentation policies (data/augment.py), mixing (data/mixing.py), repeated augmentation (data/samplers.py)
    auto_augment: str = option("none", "torchvision policy per training image: none | randaugment | trivialaugment | "
                                       "autoaugment-imagenet | autoaugment-cifar10 | autoaugment-svhn | augmix",
                               choices=("none", "randaugment", "trivialaugment", "autoaugment-imagenet",
                                        "autoaugment-cifar10", "autoaugment-svhn", "augmix"))
    aa_magnitude: int = option(9, "randaugment: magnitude bin of every op (0 .. --aa-bins - 1)")
    aa_num_ops: int = option(2, "randaugment: ops applied to each image")
    aa_bins: int = option(31, "randaugment / trivialaugment: number of magnitude bins")
    augmix_severity: int = option(3, "augmix: severity of its ops (1..10)")
    augmix_width: int = option(3, "augmix: augmentation chains mixed")
    random_erase: float = option(0.0, "probability of erasing a random rectangle of each training image with noise "
                                      "(timm's --reprob; 0: off)")
    mixup: float = option(0.0, "Mixup's Beta(alpha, alpha) for training batches (0: off)")
    cutmix: float = option(0.0, "CutMix's Beta(alpha, alpha) for training batches (0: off)")
    mix_prob: float = option(1.0, "probability that a batch is mixed (--mixup / --cutmix)")
    mixup_switch_prob: float = option(0.5, "with --mixup and --cutmix: probability of CutMix for a mixed batch")
    repeated_aug: int = option(0, "repeated augmentation: each epoch shows 1/N of the images N times, each copy "
                                  "augmented apart (timm's --aug-repeats; 0 or 1: off)")

    def validate(self) -> None:
        if self.max_image_pixels < 0:
            raise ConfigError(f"--max-image-pixels must be >= 0 (0: no limit), got {self.max_image_pixels}")
        self._validate_augmentation()

    def _validate_augmentation(self) -> None:
        for name in ("random_erase", "mix_prob", "mixup_switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{flag(name)} is a probability in [0, 1], got {getattr(self, name)}")
        if self.mixup < 0 or self.cutmix < 0 or self.repeated_aug < 0:
            raise ConfigError(f"--mixup, --cutmix and --repeated-aug must be >= 0, got {self.mixup}, {self.cutmix} "
                              f"and {self.repeated_aug}")
        if not 0 <= self.aa_magnitude < self.aa_bins or self.aa_num_ops < 1:
            raise ConfigError(f"--aa-magnitude must be in [0, --aa-bins {self.aa_bins}) and --aa-num-ops >= 1, got "
                              f"{self.aa_magnitude} and {self.aa_num_ops}")
        if not 1 <= self.augmix_severity <= 10 or self.augmix_width < 1:
            raise ConfigError(f"--augmix-severity must be in 1..10 and --augmix-width >= 1, got "
                              f"{self.augmix_severity} and {self.augmix_width}")
        if self.repeated_aug > 1 and getattr(self, "balanced_sampler", False):
            raise ConfigError("--repeated-aug and --balanced-sampler each decide the epoch's images: drop one")


@dataclass(frozen=True)
class NetConfig(Section):
    title: ClassVar[str] = "model"

    model: str = option("resnet20", "model name (`cnntrain models` lists them)")
    model_kwargs: dict[str, Any] = option({}, "extra keyword arguments of the model's constructor")
    # Fine-tuning (engine/finetune.py, models/pretrained.py).
    pretrained: str = option("", "start from published weights: a torchvision weights tag (DEFAULT, IMAGENET1K_V1, "
                                 "...), for timm/<name> a timm tag or a weights file (\"\": random init; the flag "
                                 "alone: DEFAULT); their preprocessing becomes the run's")
    init_from: str = option("", "start from the tensors of a run folder, checkpoint, model.safetensors or state-dict "
                                "file that match by name and shape (a new head for another class count)")
    freeze: str = option("none", "none | backbone (all but the classifier head) | module prefixes, comma-separated; "
                                 "frozen parts keep their weights and BatchNorm statistics")
    unfreeze_at: float = option(0.0, "epoch from which the frozen parts train too (0: never)")
    head_lr_mult: float = option(1.0, "LR multiplier of the classifier head")
    layer_decay: float = option(1.0, "layer-wise LR decay: each layer down from the head gets this times the "
                                     "LR of the one above (1: off; timm / BEiT)")

    def validate(self) -> None:
        if self.pretrained and self.init_from:
            raise ConfigError("--pretrained and --init-from both give the starting weights: pick one")
        if self.unfreeze_at < 0 or (self.unfreeze_at and self.freeze == "none"):
            raise ConfigError(f"--unfreeze-at {self.unfreeze_at} needs --freeze (and an epoch >= 0)")
        if self.head_lr_mult <= 0:
            raise ConfigError(f"--head-lr-mult must be positive, got {self.head_lr_mult}")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")


@dataclass(frozen=True)
class OptimConfig(Section):
    title: ClassVar[str] = "optimisation"

    epochs: float = option(10, "passes over the training set; fractions allowed (0: --max-steps decides)")
    max_steps: int = option(0, "stop after this many optimizer steps (0: run all epochs)")
    batch_size: int = option(128, "images per process and micro-batch")
    accum_steps: int = option(1, "micro-batches per optimizer step (gradient accumulation): global batch x this")
    lr: float = option(0.1, "peak learning rate for the whole (global) batch, before --scale-lr")
    scale_lr: float = option(0, "linear scaling rule: lr *= global_batch / scale_lr (0: off)")
    optimizer: str = option("sgd", "sgd | nesterov | adam | adamw", choices=("sgd", "nesterov", "adam", "adamw"))
    momentum: float = option(0.9, "SGD momentum (sgd, nesterov; adam and adamw keep their own betas)")
    weight_decay: float = option(5e-4, "weight decay coefficient per unit of lr (L2 term added to the gradient; "
                                       "adamw: decoupled)")
    decay_bn_bias: bool = option(True, "apply weight decay to BatchNorm weights and biases too")
    norm_lr_scale: float = option(1.0, "LR multiplier for normalisation-layer parameters (BatchNorm shifts and "
                                       "scales)")
    lr_schedule: str = option("cosine", "constant | step | multistep | cosine | poly | onecycle | plateau (times "
                                        "--lr-gamma when --early-stop-metric stops improving)",
                              choices=("constant", "step", "multistep", "cosine", "poly", "onecycle", "plateau"))
    lr_milestones: tuple[float, ...] = option((), "epochs, for step / multistep")
    lr_step_epochs: float = option(30, "step: decay every this many epochs")
    lr_gamma: float = option(0.1, "step / multistep decay factor")
    lr_power: float = option(2.0, "poly: (1 - t)^power, as nvcnn")
    lr_final: float = option(0.0, "cosine / poly / onecycle end at lr * lr_final")
    warmup_epochs: float = option(0, "linear warm-up from 0 over this many epochs")
    label_smoothing: float = option(0.0, "fraction of each target's probability spread evenly over all classes "
                                         "(0: off)")
    grad_clip: float = option(0.0, "max global gradient norm (0: off)")
    ema_decay: float = option(0.0, "exponential moving average of weights (0: off), evaluated instead")
    lookahead: int = option(0, "every this many steps pull the weights back toward a slow copy (0: off)")
    lookahead_alpha: float = option(0.95, "per-step lookahead rate; the pull ramps as (alpha^k) * (step/total)^3")
    larc_mode: str = option("none", "none | clip | scale", choices=("none", "clip", "scale"))
    larc_eta: float = option(0.003, "LARC trust coefficient: a layer's local lr is eta * |w| / (|g| + eps)")
    larc_eps: float = option(1e-8, "LARC: added to the gradient norm so that a zero gradient does not divide by 0")
    larc_bn_bias: bool = option(False, "apply LARC to biases and normalisation parameters too (nvcnn leaves "
                                       "them out)")
    class_weights: str = option("", "loss weight per class: auto (inverse class frequency) or a file (class: weight "
                                    "mapping, or one weight per line in class order); \"\": equal")
    early_stop: int = option(0, "stop when --early-stop-metric has not improved for this many evaluations (0: off); "
                                "model.safetensors holds the best evaluation's weights")
    early_stop_metric: str = option("loss", "validation metric watched by --early-stop and --lr-schedule plateau: "
                                            "loss | top1 | top5 | f1 (macro F1)",
                                    choices=("loss", "top1", "top5", "f1"))
    early_stop_min_delta: float = option(0.0, "smallest change of --early-stop-metric that counts as an improvement "
                                              "(top1 / top5 / f1 as fractions)")
    plateau_patience: int = option(2, "--lr-schedule plateau: evaluations without improvement before the LR drops")

    def validate(self) -> None:
        _positive(self, "batch_size", "accum_steps")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("nothing to train: give --epochs > 0 or --max-steps > 0")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.norm_lr_scale <= 0:
            raise ConfigError(f"--norm-lr-scale must be positive, got {self.norm_lr_scale}")
        if self.lr_schedule == "multistep" and not self.lr_milestones:
            raise ConfigError("--lr-schedule multistep needs --lr-milestones (epochs, e.g. 100 150)")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.early_stop < 0 or self.plateau_patience < 0 or self.early_stop_min_delta < 0:
            raise ConfigError(f"--early-stop, --plateau-patience and --early-stop-min-delta must be >= 0, got "
                              f"{self.early_stop}, {self.plateau_patience} and {self.early_stop_min_delta}")
        if self.lookahead < 0 or not 0 < self.lookahead_alpha < 1:
            raise ConfigError(f"--lookahead must be >= 0 and --lookahead-alpha in (0, 1), got {self.lookahead} and "
                              f"{self.lookahead_alpha}")


@dataclass(frozen=True)
class ComputeConfig(Section):
    title: ClassVar[str] = "precision and speed"

    device: str = option("auto", "auto | cpu | cuda (cudnn is an alias of cuda)", choices=("auto", "cpu", "cuda"))
    precision: str = option("auto", "auto | fp32 | fp16 | bf16 (autocast; fp32 master weights). auto, chosen at "
                                    "run start and stored in config.yaml and checkpoints: bf16 where the device "
                                    "computes it natively and fast (CUDA compute capability >= 8.0; CPUs with "
                                    "AVX512-BF16 or AMX where a short probe measures bf16 convolutions >= 1.1x "
                                    "fp32's speed), fp16 with dynamic loss scaling on older CUDA GPUs, fp32 "
                                    "elsewhere",
                            choices=("auto", "fp32", "fp16", "bf16"))
    loss_scale: float = option(0.0, "fp16 static loss scale (0: dynamic); with --precision auto only where auto "
                                    "picks fp16")
    channels_last: bool = option(True, "NHWC memory layout for the model and its inputs (faster convolutions on "
                                       "tensor cores)")
    compile: bool = option(False, "torch.compile the model: slower first steps, faster ones after")
    threads: int = option(0, "intra-op CPU threads (0: one per core this process may use)")
    deterministic: bool = option(False, "deterministic kernels where torch has them and no cuDNN autotuning: "
                                        "repeatable runs, slower")

    def validate(self) -> None:
        # With auto the device decides; hardware.with_resolved_precision refuses a scale it cannot use.
        if self.loss_scale and self.precision not in ("fp16", "auto"):
            raise ConfigError(f"--loss-scale applies to --precision fp16 only, not {self.precision}")


@dataclass(frozen=True)
class RunConfig(Section):
    title: ClassVar[str] = "run and outputs"

    seed: int = option(0, "seed of the initial weights, shuffling, augmentation and synthetic data")
    run_dir: str = option("", "default runs/<dataset>-<model>-<timestamp>")
    display_every: int = option(50, "steps between log lines")
    eval_every: int = option(0, "steps between evaluations (0: at each epoch end)")
    save_every: int = option(0, "steps between checkpoints (0: at each epoch end)")
    save_interval: float = option(0.0, "also checkpoint when this many seconds have passed (0: off; ranks>1: at a "
                                       "log line)")
    keep_last: int = option(3, "checkpoints kept besides best.pt")
    resume: str = option("", '"" | auto | path to a checkpoint or run folder')
    overwrite: bool = option(False, "start a new run in a --run-dir that already holds checkpoints, replacing them "
                                    "(without it such a run is refused unless --resume)")
    max_bad_steps: int = option(20, "stop when the loss is not finite this many steps in a row")
    progress: str = option("auto", "auto | bar | log | none", choices=("auto", "bar", "log", "none"))
    tensorboard: bool = option(False, "also write TensorBoard event files to <run-dir>/tb")
    callbacks: tuple[str, ...] = option((), "extra callbacks, each module.path:Name of a cnntrain Callback class (or "
                                            "of a callable returning one)")
    mlflow: str = option("", "log to MLflow: a tracking URI, or local for a store in <runs>/mlruns (--mlflow alone)")
    wandb: str = option("", "log to Weights & Biases, in this project (--wandb alone: cnntrain); "
                            "WANDB_MODE=offline works")
    profile: str = option("none", "none | phases (data/forward/backward/communication/optimizer) | ops "
                                  "(torch.profiler)", choices=("none", "phases", "ops"))

    def validate(self) -> None:
        _positive(self, "display_every")


@dataclass(frozen=True)
class SyncConfig(Section):
    title: ClassVar[str] = "synchronous data parallel"

    dist_backend: str = option("auto", "auto | gloo | nccl", choices=("auto", "gloo", "nccl"))
    dist_timeout: float = option(300.0, "seconds before a lost peer ends the job")
    bucket_mb: float = option(25.0, "DDP gradient bucket size in MB (powersgd on gloo: one bucket)")
    overlap: bool = option(True, "all-reduce overlapped with backward (DDP buckets)")
    grad_compression: str = option("none", "none | fp16 | bf16 | powersgd | topk | threshold",
                                   choices=("none", "fp16", "bf16", *HOOK_COMPRESSIONS))
    compression_ratio: float = option(0.05, "topk: fraction of each gradient bucket sent; --partial-update: of "
                                            "params averaged")
    compression_threshold: float = option(0.0, "threshold: gradient entries with |g| >= this are sent (required, "
                                               "> 0)")
    partial_update: bool = option(False, "local optimizer steps; one chunk of the parameters averaged across ranks "
                                         "per step")
    sync_bn: bool = option(False, "SyncBatchNorm across ranks (CUDA only)")

    def validate(self) -> None:
        if not 0 < self.compression_ratio <= 1:
            raise ConfigError(f"--compression-ratio must be in (0, 1], got {self.compression_ratio}")
        if self.grad_compression == "threshold" and self.compression_threshold <= 0:
            raise ConfigError(f"--grad-compression threshold needs --compression-threshold T > 0 (gradient entries "
                              f"with |g| >= T are sent), got {self.compression_threshold}")
        if self.partial_update and self.grad_compression != "none":
            raise ConfigError(f"--partial-update averages parameters, not gradients: it cannot be combined with "
                              f"--grad-compression {self.grad_compression}; drop one")
        if self.grad_compression in HOOK_COMPRESSIONS and not self.overlap:
            raise ConfigError(f"--grad-compression {self.grad_compression} is a DDP hook: it needs --overlap "
                              f"(drop --no-overlap)")


@dataclass(frozen=True)
class AsyncPsConfig(Section):
    """The cluster is given once, the same on every process: ``--ps-hosts``/``--worker-hosts``, or
    cifar-tf's ``--ps-count``/``--worker-count``/``--dist-start-port`` for every role on 127.0.0.1."""

    title: ClassVar[str] = "asynchronous parameter server"

    strategy: str = option("sync", "sync (one process, or data parallel under a launcher) | async-ps (parameter "
                                   "servers)", choices=("sync", "async-ps"))
    role: str = option("", 'async-ps: ps | chief | worker | evaluator ("": start every role on this machine)',
                       choices=("", "ps", "chief", "worker", "evaluator"))
    ps_index: int = option(-1, "--role ps: which parameter server this is (0-based)")
    worker_index: int = option(-1, "--role worker: which worker this is (1-based; the chief is worker 0)")
    ps_hosts: str = option("", "the parameter servers, host:port,host:port (the same on every role)")
    worker_hosts: str = option("", "the training processes, host[:port],... chief first (they only connect out)")
    ps_count: int = option(0, "instead of --ps-hosts: this many ps on 127.0.0.1 from --dist-start-port (cifar-tf)")
    worker_count: int = option(0, "instead of --worker-hosts: this many training processes on 127.0.0.1, chief "
                                  "included")
    dist_start_port: int = option(0, f"first ps port with --ps-count (0: {DEFAULT_START_PORT}; free ports when "
                                     f"every role starts here)")
    max_staleness: int = option(-1, "apply no gradient more than this many updates after its weights were pulled "
                                    "(-1: off)")
    evaluator: bool = option(False, "every role on this machine: also start an evaluator")
    ps_token: str = option("", "shared secret every async-ps role proves in its handshake (default: "
                               "$CNNTRAIN_PS_TOKEN; a job started here makes a random one)", secret=True)

    def validate(self) -> None:
        if self.strategy != "async-ps":
            given = {"role": self.role, "ps_hosts": self.ps_hosts, "worker_hosts": self.worker_hosts,
                     "ps_count": self.ps_count, "worker_count": self.worker_count, "evaluator": self.evaluator,
                     "max_staleness": self.max_staleness >= 0, "ps_token": self.ps_token}
            for name, value in given.items():
                if value:
                    name = "--ps" if name == "ps_count" else flag(name)
                    raise ConfigError(f"{name} belongs to --strategy async-ps (add it, or drop {name})")
            return
        if self.ps_hosts and self.ps_count:
            raise ConfigError("give the parameter servers once: --ps-hosts or --ps-count, not both")
        if self.worker_hosts and self.worker_count:
            raise ConfigError("give the workers once: --worker-hosts or --worker-count, not both")
        if self.ps_count < 0 or self.worker_count < 0:
            raise ConfigError("--ps-count and --worker-count must be positive")
        if self.max_staleness < -1:
            raise ConfigError(f"--max-staleness must be >= 0 (or -1: off), got {self.max_staleness}")
        if self.role:  # without a role the local launcher checks its own counts
            self._validate_role()

    def _validate_role(self) -> None:
        ps, workers = self.cluster_addresses()
        num_ps, num_workers = len(ps), len(workers)
        if self.role == "ps":
            if self.ps_index < 0:
                raise ConfigError(f"--role ps needs --ps-index i (0..{num_ps - 1})")
            if self.ps_index >= num_ps:
                raise ConfigError(f"--ps-index {self.ps_index} is out of range: the cluster has {num_ps} ps "
                                  f"(0..{num_ps - 1})")
        elif self.ps_index >= 0:
            raise ConfigError(f"--ps-index belongs to --role ps, not --role {self.role}")
        if self.role == "worker":
            if self.worker_index < 0:
                raise ConfigError(f"--role worker needs --worker-index i (1..{num_workers - 1}; worker 0 is the "
                                  f"chief)")
            if self.worker_index == 0:
                raise ConfigError("--worker-index 0 is the chief: start it with --role chief")
            if self.worker_index >= num_workers:
                raise ConfigError(f"--worker-index {self.worker_index} is out of range: the cluster has "
                                  f"{num_workers} workers, the chief included (1..{num_workers - 1})")
        elif self.worker_index >= 0:
            raise ConfigError(f"--worker-index belongs to --role worker, not --role {self.role}")

    def cluster_addresses(self) -> tuple[tuple[tuple[str, int], ...], tuple[str, ...]]:
        """(host, port) of each parameter server, and the host of each training process (the chief first).

        Only the ps listen; the chief, workers and the evaluator connect out, so a worker's port is
        accepted and unused and its host names the interface its connections use."""
        if self.ps_hosts:
            ps = tuple(split_host_port(e, "--ps-hosts", True) for e in self.ps_hosts.split(",") if e.strip())
        else:
            start = self.dist_start_port or DEFAULT_START_PORT
            ps = tuple(("127.0.0.1", start + i) for i in range(self.ps_count))
        if self.worker_hosts:
            workers = tuple(split_host_port(e, "--worker-hosts", False)[0]
                            for e in self.worker_hosts.split(",") if e.strip())
        else:
            workers = ("127.0.0.1",) * self.worker_count
        if not ps or not workers:
            raise ConfigError("--strategy async-ps needs the cluster: --ps-hosts h:p,... and --worker-hosts h,... "
                              "(the chief first), or --ps-count N and --worker-count N for one host")
        if len(set(ps)) != len(ps):
            raise ConfigError(f"--ps-hosts lists an address twice: {self.ps_hosts}")
        return ps, workers


def split_host_port(entry: str, option: str, need_port: bool) -> tuple[str, int]:
    """``host:port``, ``[v6 address]:port`` or (``need_port`` false) a bare host -> (host, port or 0)."""
    entry = entry.strip()
    if entry.startswith("["):  # [v6 address]:port
        host, _, rest = entry[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif entry.count(":") == 1:
        host, port_text = entry.split(":")
    else:
        host, port_text = entry, ""
    if not host or (need_port and not port_text):
        raise ConfigError(f"{option}: {entry!r} is not host:port")
    try:
        port = int(port_text) if port_text else 0
    except ValueError:
        raise ConfigError(f"{option}: {entry!r} has no valid port number") from None
    if not 0 <= port < 65536 or (need_port and port == 0):
        raise ConfigError(f"{option}: port {port} in {entry!r} is out of range (1..65535)")
    return host, port
