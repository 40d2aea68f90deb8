"""The GPU numbers of "fast by default", from one command on one GPU in under 8 minutes.

    python benchmarks/gpu_suite.py                             # CUDA machine, ../shared/data beside the repo
    python benchmarks/gpu_suite.py --json gpu_suite.json       # the table, and every number as JSON
    python benchmarks/gpu_suite.py --json > gpu_suite.json     # JSON only, on stdout
    python benchmarks/gpu_suite.py --tiny --device cpu         # everything tiny: a smoke test, under a minute

Parts (each a section of the table and a key of the JSON):

1. ``throughput``: ResNet-50 training img/s at 224 px, batch 128, on synthetic batches, measured by
   ``cnntrain.bench.bench`` (the engine's own ``train_step``: autocast, loss scaling, SGD): fp32 /
   bf16 / fp16, each with channels_last on and off, then each through ``torch.compile`` with
   channels_last (the compiled rows come last: the deadline cuts them first).
2. ``cifar10_fast``: ``cnntrain.train(recipe="cifar10-fast")`` on the CIFAR-10 training JPEGs
   (``--cifar-jpegs``: the tarball or its extracted folder), 45,000 trained on and 5,000 held out;
   the seconds (training + evaluations, the run's own clock) to each target accuracy on the held-out
   images, recorded at each evaluation by a ``cnntrain.Callback``; it stops at 94% or after
   ``--cifar-budget`` seconds. Also the folder's load time: decoded (and written to the
   decoded-image cache), then mapped from that cache.
3. ``jpeg_decode``: the input pipeline alone on the ants/bees photos (``--photos``), JPEGs decoded by
   DataLoader workers (PIL) against decoded on the device (nvJPEG), each a fresh
   ``cnntrain bench --data-only`` process (``benchmarks/jpeg_decode.py``'s ``measure``).
4. ``ddp``: ResNet-50 bf16 training img/s of 2 processes (NCCL, one GPU each) against 1, with
   ``--nproc-per-node``; skipped with a note on a machine with fewer than 2 GPUs.

``--deadline`` (seconds, default 450, imports included) bounds the whole run: a part or row that
would not fit in what is left (by an estimate, then by the longest of its kind so far) is listed as
skipped instead of started. Every row says the precision it ran, and the
header what ``--precision auto`` picks on this machine.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

STARTED = time.perf_counter()  # the deadline counts torch's import too

import numpy as np  # noqa: E402 - after STARTED
import torch  # noqa: E402
from PIL import Image  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path[:0] = [str(REPO), str(BENCHMARKS)]

from jpeg_decode import measure  # noqa: E402 - benchmarks/jpeg_decode.py

import cnntrain  # noqa: E402 - needs the path above
from cnntrain.bench import bench, machine_line  # noqa: E402
from cnntrain.data.folder import load_image_folder  # noqa: E402
from cnntrain.hardware import pick_device, resolve_precision  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
PRECISIONS = ("fp32", "bf16", "fp16")
TARGETS = (85.0, 90.0, 91.0, 92.0, 93.0, 94.0)  # held-out accuracy, %
# Seconds a part is expected to need on one H200-class GPU, with margin: what the deadline plans with
# until a part of the kind has run (then 1.2 x the longest one seen).
NEED_S = {"eager": 25, "compile": 110, "cifar": 165, "decode": 50, "ddp": 150}


class Deadline:
    """The time left for the suite, and whether a part expected to take so long still fits."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.started, self.need = seconds, STARTED, dict(NEED_S)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def allows(self, part: str, tiny: bool) -> bool:
        return tiny or self.seconds - self.elapsed() >= self.need[part]

    def took(self, part: str, seconds: float) -> None:
        self.need[part] = max(self.need[part], 1.2 * seconds)

    def skipped(self) -> str:
        return f"skipped: would pass the --deadline of {self.seconds:.0f} s"


def note(text: str) -> None:
    print(f"[gpu_suite {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _error(exc: BaseException) -> str:
    traceback.print_exc(file=sys.stderr)
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _free_device() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------- 1. throughput


def throughput_row(args: argparse.Namespace, precision: str, channels_last: bool, compiled: bool,
                   deadline: Deadline) -> dict:
    row = {"model": args.model, "image_size": args.image_size, "batch_size": args.batch_size, "precision": precision,
           "channels_last": channels_last, "compile": compiled, "img_per_s": None, "img_per_s_stderr": None,
           "peak_memory_mb": None, "status": "ok"}
    if compiled and args.tiny:
        row["status"] = "skipped: --tiny (compiling takes minutes on a CPU)"
        return row
    if not deadline.allows("compile" if compiled else "eager", args.tiny):
        row["status"] = deadline.skipped()
        return row
    note(f"throughput: {args.model} {precision}, channels_last {channels_last}, compile {compiled}")
    try:
        result = bench(args.model, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                       precision=precision, device=args.device, image_size=args.image_size, threads=args.threads,
                       channels_last=channels_last, compile=compiled)
        row.update(img_per_s=result.img_per_s, img_per_s_stderr=result.img_per_s_stderr,
                   peak_memory_mb=result.peak_memory_mb, phase_ms=result.phase_ms)
    except Exception as exc:  # noqa: BLE001 - one failed row must not end the suite
        row["status"] = _error(exc)
    finally:
        if compiled:
            torch._dynamo.reset()  # each row compiles its own model from scratch
        _free_device()
    return row


# ------------------------------------------------------------------------------------ 2. cifar10-fast


class TimeToAccuracy(cnntrain.Callback):
    """Records (seconds, held-out top-1 %) at each evaluation; stops the run at the last target or
    once the budget is spent (by raising ``Stop``, caught by the suite)."""

    class Stop(Exception):
        pass

    def __init__(self, targets: tuple[float, ...], budget_s: float) -> None:
        self.targets, self.budget_s = targets, budget_s
        self.curve: list[tuple[float, float, int]] = []  # seconds, accuracy %, step
        self.setup_s: float | None = None
        self.called = time.perf_counter()
        self.stopped = "epochs done"

    def on_train_start(self, loop) -> None:
        self.setup_s = time.perf_counter() - self.called  # data load, model, whitening init

    def on_eval_end(self, loop, result) -> None:
        seconds, accuracy = loop.elapsed(), 100 * result.top1
        self.curve.append((seconds, accuracy, loop.state.step))
        note(f"cifar10-fast: {accuracy:.2f}% after {seconds:.1f} s (step {loop.state.step})")
        if accuracy >= max(self.targets):
            self.stopped = f"reached {max(self.targets):g}%"
            raise self.Stop
        if seconds >= self.budget_s:
            self.stopped = f"budget of {self.budget_s:g} s spent"
            raise self.Stop

    def first_time(self, target: float) -> float | None:
        return next((t for t, acc, _ in self.curve if acc >= target), None)


def _extract(archive: Path, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        try:
            tar.extractall(into, filter="data")
        except TypeError:  # Python without extraction filters
            tar.extractall(into)  # noqa: S202 - our own shared data files
    return into


def _folder_root(path: Path, work: Path, name: str) -> Path:
    """A folder holding train/ (and maybe val/): ``path`` itself, or the tarball extracted under ``work``."""
    if path.is_dir():
        return path
    root = _extract(path, work / name)
    found = [p.parent for p in root.rglob("train") if p.is_dir()]
    if not found:
        raise FileNotFoundError(f"{path} holds no train/ folder")
    return min(found, key=lambda p: len(p.parts))


def cifar10_fast(args: argparse.Namespace, work: Path, deadline: Deadline) -> dict:
    out: dict = {"recipe": "cifar10-fast", "status": "ok"}
    if not deadline.allows("cifar", args.tiny):
        out["status"] = deadline.skipped()
        return out
    try:
        if args.tiny:
            root = write_jpeg_folder(work / "cifar", classes=10, per_class=30, sizes=[(32, 32)])
            options = dict(val_split=60, batch_size=32, epochs=2)
        else:
            note(f"cifar10-fast: preparing {args.cifar_jpegs}")
            root = _folder_root(Path(args.cifar_jpegs), work, "cifar")
            options = dict(val_split=5000, **({"epochs": args.cifar_epochs} if args.cifar_epochs else {}))
        cache = work / "decoded-cache"
        started = time.perf_counter()
        images = len(load_image_folder(root, "train", cache_dir=cache))
        cold = time.perf_counter() - started
        started = time.perf_counter()
        load_image_folder(root, "train", cache_dir=cache)
        out.update(images=images, load_decoded_s=cold, load_cached_s=time.perf_counter() - started)
        note(f"cifar10-fast: {images} images, decoded in {cold:.1f} s, from the cache in {out['load_cached_s']:.2f} s")
        watch = TimeToAccuracy(TARGETS, args.cifar_budget)
        run_dir = work / "cifar10-fast-run"
        try:
            result = cnntrain.train(recipe="cifar10-fast", dataset="folder", data_dir=str(root), cache_dir=str(cache),
                                    run_dir=str(run_dir), device=args.device, progress="none", threads=args.threads,
                                    callbacks=[watch], **options)
            out.update(precision=result.summary["precision"], img_per_s=result.summary["img_per_s"])
        except TimeToAccuracy.Stop:
            out["precision"] = cnntrain.build_config(str(run_dir / "config.yaml")).precision
        best = max((acc for _, acc, _ in watch.curve), default=None)
        out.update(train_images=images - options["val_split"], held_out=options["val_split"],
                   setup_s=watch.setup_s, curve=[list(p) for p in watch.curve], best_top1=best,
                   seconds_to={f"{t:g}": watch.first_time(t) for t in TARGETS}, stopped=watch.stopped,
                   budget_s=args.cifar_budget)
    except Exception as exc:  # noqa: BLE001
        out["status"] = _error(exc)
    _free_device()
    return out


# ------------------------------------------------------------------------------------- 3. JPEG decode


def write_jpeg_folder(root: Path, classes: int, per_class: int, sizes: list[tuple[int, int]]) -> Path:
    """``root/train/c<k>/<i>.jpg``: a colour per class plus noise, sizes (w, h) taken in turn."""
    rng = np.random.default_rng(0)
    for k in range(classes):
        (root / "train" / f"c{k}").mkdir(parents=True, exist_ok=True)
        colour = rng.integers(30, 226, size=3)
        for i in range(per_class):
            w, h = sizes[(k * per_class + i) % len(sizes)]
            pixels = np.clip(colour + rng.integers(-40, 41, size=(h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(root / "train" / f"c{k}" / f"{i:04d}.jpg", quality=90)
    return root


def jpeg_decode(args: argparse.Namespace, work: Path, deadline: Deadline) -> dict:
    out: dict = {"status": "ok"}
    if not deadline.allows("decode", args.tiny):
        out["status"] = deadline.skipped()
        return out
    try:
        if args.tiny:
            root = write_jpeg_folder(work / "photos", classes=2, per_class=20,
                                     sizes=[(96, 64), (64, 80), (120, 90), (50, 50)])
            size, batch, steps, warmup, workers = 32, 8, 3, 1, 0
        else:
            note(f"jpeg decode: preparing {args.photos}")
            root = _folder_root(Path(args.photos), work, "photos")
            size, batch, steps, warmup, workers = 224, args.decode_batch_size, 10, 2, args.decode_workers
        how = argparse.Namespace(data_dir=str(root), image_size=size, batch_size=batch, steps=steps, warmup=warmup,
                                 workers=workers, threads=args.threads, device=args.device)
        on_cuda = pick_device(args.device).type == "cuda"
        out.update(data=str(root), image_size=size, batch_size=batch, workers=workers,
                   device_decoder="nvJPEG" if on_cuda else "libjpeg-turbo in the main process (no CUDA)")
        for decode in ("host", "device"):
            note(f"jpeg decode: {decode}")
            try:
                out[f"{decode}_img_per_s"] = measure(decode, how)
            except subprocess.CalledProcessError as exc:
                out[f"{decode}_img_per_s"] = None
                out["status"] = f"error: decode {decode}: {(exc.stderr or '').strip().splitlines()[-1:]}"
        if out.get("host_img_per_s") and out.get("device_img_per_s"):
            out["device_over_host"] = out["device_img_per_s"] / out["host_img_per_s"]
    except Exception as exc:  # noqa: BLE001
        out["status"] = _error(exc)
    return out


# --------------------------------------------------------------------------------------------- 4. DDP


def _train_rate(run_dir: Path) -> float:
    """Mean of the run's per-window img/s after its first (warm-up) window."""
    with open(run_dir / "metrics.csv") as f:
        rates = [float(r["img_per_s"]) for r in csv.DictReader(f) if r["split"] == "train" and r["img_per_s"]]
    return statistics.mean(rates[1:] or rates)


def ddp(args: argparse.Namespace, work: Path, deadline: Deadline) -> dict:
    gpus = torch.cuda.device_count() if args.device != "cpu" else 0
    batch, steps = args.ddp_batch_size, 40
    out: dict = {"model": args.model, "precision": "bf16", "batch_size_per_gpu": batch, "status": "ok"}
    if gpus < 2:
        out["status"] = f"skipped: needs 2 CUDA devices, found {gpus}"
        return out
    if not deadline.allows("ddp", args.tiny):
        out["status"] = deadline.skipped()
        return out
    try:
        for world in (1, 2):
            note(f"ddp: {world} process(es)")
            run_dir = work / f"ddp-{world}"
            cmd = [sys.executable, "-m", "cnntrain", "train", "--nproc-per-node", str(world), "--dataset", "synthetic",
                   "--model", args.model, "--synthetic-shape", "3", str(args.image_size), str(args.image_size),
                   "--synthetic-size", str(batch * world * (steps + 1)), "--synthetic-classes", "1000",
                   "--batch-size", str(batch), "--epochs", "0", "--max-steps", str(steps), "--display-every", "10",
                   "--precision", "bf16", "--dist-backend", "nccl", "--run-dir", str(run_dir), "--progress", "log"]
            subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True, timeout=300)
            out[f"img_per_s_{world}"] = _train_rate(run_dir)
        out["scaling_efficiency"] = out["img_per_s_2"] / (2 * out["img_per_s_1"])
    except subprocess.CalledProcessError as exc:
        out["status"] = f"error: {(exc.stderr or '').strip().splitlines()[-1:]}"
    except Exception as exc:  # noqa: BLE001
        out["status"] = _error(exc)
    return out


# ----------------------------------------------------------------------------------------------- table


def _num(value, fmt: str, width: int) -> str:
    return f"{value:{width}{fmt}}" if isinstance(value, (int, float)) else f"{'-':>{width}s}"


def table(report: dict) -> str:
    lines = [f"cnntrain GPU suite on {report['device_name']}; {report['machine']}",
             f"precision auto -> {report['precision_auto']['precision']} ({report['precision_auto']['reason']}); "
             f"{report['seconds']:.0f} s in all{' (--tiny)' if report['tiny'] else ''}", ""]
    rows = report["throughput"]
    if rows:
        r0 = rows[0]
        lines.append(f"throughput: {r0['model']} training, {r0['image_size']} px, batch {r0['batch_size']}, synthetic "
                     f"batches (img/s +- s.e.)")
        lines.append(f"  {'precision':9s} {'channels_last':>13s} {'compile':>8s} {'img/s':>10s} {'+- s.e.':>8s} "
                     f"{'peak MiB':>9s}  status")
        for r in rows:
            lines.append(f"  {r['precision']:9s} {'on' if r['channels_last'] else 'off':>13s} "
                         f"{'on' if r['compile'] else 'off':>8s} {_num(r['img_per_s'], '.1f', 10)} "
                         f"{_num(r['img_per_s_stderr'], '.1f', 8)} {_num(r['peak_memory_mb'], '.0f', 9)}  "
                         f"{r['status']}")
    c = report["cifar10_fast"]
    lines += ["", f"cifar10_fast: {c.get('train_images', '?')} train / {c.get('held_out', '?')} held out, "
                  f"{c.get('precision', '?')}; {c['status']}"]
    if "load_decoded_s" in c:
        lines.append(f"  folder load: {c['load_decoded_s']:.1f} s decoded (and cached), {c['load_cached_s']:.2f} s "
                     f"from the decoded-image cache ({c['images']} images)")
    if "seconds_to" in c:
        lines.append("  target  seconds (training + evaluations)")
        lines += [f"  {t:>5s}%  {_num(s, '.1f', 8)}" for t, s in c["seconds_to"].items()]
        best = f"{c['best_top1']:.2f}%" if c["best_top1"] is not None else "-"
        lines.append(f"  best {best} at {len(c['curve'])} evaluations; stopped: {c['stopped']}; setup "
                     f"{_num(c['setup_s'], '.1f', 0)} s")
    d = report["jpeg_decode"]
    lines += ["", f"jpeg_decode: {d.get('data', '?')}, {d.get('image_size', '?')} px, batch "
                  f"{d.get('batch_size', '?')}, {d.get('workers', '?')} workers; {d['status']}"]
    if "host_img_per_s" in d:
        ratio = f"  {d['device_over_host']:.2f}x" if "device_over_host" in d else ""
        lines.append(f"  workers (PIL)     {_num(d['host_img_per_s'], '.1f', 9)} img/s")
        lines.append(f"  on the device     {_num(d.get('device_img_per_s'), '.1f', 9)} img/s{ratio}  "
                     f"({d['device_decoder']})")
    g = report["ddp"]
    lines += ["", f"ddp: {g['model']} {g['precision']}, batch {g['batch_size_per_gpu']} per GPU, NCCL; {g['status']}"]
    if "scaling_efficiency" in g:
        lines.append(f"  1 process {g['img_per_s_1']:.1f} img/s, 2 processes {g['img_per_s_2']:.1f} img/s: "
                     f"scaling efficiency {100 * g['scaling_efficiency']:.0f}%")
    return "\n".join(lines)


def timed(deadline: Deadline, part: str, fn, *args) -> dict:
    """``fn(*args)``, its time taught to the deadline when it ran (was not skipped)."""
    started = time.perf_counter()
    out = fn(*args)
    if not out["status"].startswith("skipped"):
        deadline.took(part, time.perf_counter() - started)
    return out


def run(args: argparse.Namespace) -> dict:
    deadline = Deadline(args.deadline)
    deadline.need["cifar"] = args.cifar_budget + 45  # extraction, decoding, setup, then training

    dev = pick_device(args.device)
    precision, reason = resolve_precision("auto", dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    report = {"tiny": args.tiny, "device": str(dev), "device_name": name, "machine": machine_line(),
              "cuda": torch.version.cuda, "precision_auto": {"precision": precision, "reason": reason}}
    if args.tiny:
        args.image_size, args.batch_size, args.steps, args.warmup = 32, 2, 2, 1
    with tempfile.TemporaryDirectory(prefix="gpu_suite-") as tmp:
        work = Path(tmp)
        plan = [(p, cl) for p in PRECISIONS for cl in (True, False)]
        eager = [timed(deadline, "eager", throughput_row, args, p, cl, False, deadline) for p, cl in plan]
        report["jpeg_decode"] = timed(deadline, "decode", jpeg_decode, args, work, deadline)
        report["cifar10_fast"] = timed(deadline, "cifar", cifar10_fast, args, work, deadline)
        report["ddp"] = timed(deadline, "ddp", ddp, args, work, deadline)
        compiled = [timed(deadline, "compile", throughput_row, args, p, True, True, deadline) for p in PRECISIONS]
        report["throughput"] = eager + compiled
    report["seconds"] = deadline.elapsed()
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes, few steps, generated JPEGs: a smoke test")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="write the report as JSON to PATH (the table still printed), or alone: JSON on stdout only")
    p.add_argument("--deadline", type=float, default=450, help="seconds for everything; what would not fit is skipped")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128, help="throughput rows")
    p.add_argument("--steps", type=int, default=20, help="timed steps per throughput row")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first (cuDNN autotuning, compilation)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--cifar-jpegs", default=str(SHARED / "cifar10-jpeg-train.tar.gz"),
                   help="the CIFAR-10 training JPEGs: cifar10-jpeg-train.tar.gz or a folder holding train/")
    p.add_argument("--cifar-epochs", type=float, default=0, help="cifar10-fast epochs (0: the recipe's)")
    p.add_argument("--cifar-budget", type=float, default=120, help="stop cifar10-fast after this many seconds")
    p.add_argument("--photos", default=str(SHARED / "hymenoptera.tar"),
                   help="photos for the decode rows: hymenoptera.tar or a folder holding train/")
    p.add_argument("--decode-batch-size", type=int, default=64)
    p.add_argument("--decode-workers", type=int, default=8)
    p.add_argument("--ddp-batch-size", type=int, default=64, help="per GPU")
    args = p.parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=2)
    if args.json == "-":
        print(text)
        return
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(table(report))


if __name__ == "__main__":
    main()
