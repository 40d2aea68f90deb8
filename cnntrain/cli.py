"""The ``cnntrain`` command. Thin: it parses, builds the config and calls the API.

    cnntrain train --dataset cifar10 -n resnet20 -e 5
    cnntrain train --config nnabla-cifar10-resnet23 -b 64 -c cudnn
    cnntrain eval --checkpoint runs/cifar10-resnet20-20260101-120000
    cnntrain models
    cnntrain data download --dataset cifar100 --data-dir data
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing

from cnntrain.config import CHOICES, DEVICE_ALIASES, SECTIONS, build_config, config_field_names
from cnntrain.errors import CnnTrainError, ConfigError
from cnntrain.parallel.launch import add_launch_flags

log = logging.getLogger("cnntrain")

# Options whose flag alone means a value: --pretrained is --pretrained DEFAULT.
FLAG_ALONE = {"pretrained": "DEFAULT"}
SHORT = {"model": ["-n"], "batch_size": ["-b"], "epochs": ["-e"], "lr": ["-l"], "device": ["-c"],
         "run_dir": ["-o", "--monitor-path"], "max_steps": ["-i"], "ps_count": ["--ps"]}
BARE = {"mlflow": "local", "wandb": "cnntrain"}  # the value of the flag given alone (--mlflow)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config option, grouped by section; default None so a recipe's value stands unless given."""
    for cls in SECTIONS.values():
        group = parser.add_argument_group(cls.title)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            _add_option_flag(group, f, hints[f.name])


def _add_option_flag(group: argparse._ArgumentGroup, f: dataclasses.Field, hint) -> None:
    flag = "--" + f.name.replace("_", "-")
    names = [*SHORT.get(f.name, []), flag]
    text = f.metadata["help"]
    if typing.get_origin(hint) is dict:
        text += "; as key=value,key=value"
    if not f.metadata["secret"]:
        text += f" [default: {_show(f.default_factory() if callable(f.default_factory) else f.default)}]"
    text = text.replace("%", "%%")  # argparse formats help with %
    if hint is bool:
        group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
    elif typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        group.add_argument(*names, dest=f.name, nargs="+", type=item, default=None, help=text)
    elif typing.get_origin(hint) is dict:
        group.add_argument(*names, dest=f.name, type=_key_values, default=None, help=text)
    elif f.name in FLAG_ALONE:
        group.add_argument(*names, dest=f.name, nargs="?", const=FLAG_ALONE[f.name], default=None, help=text)
    else:
        choices = CHOICES.get(f.name)
        if f.name == "device":
            choices = (*choices, *DEVICE_ALIASES)
        bare = {"nargs": "?", "const": BARE[f.name]} if f.name in BARE else {}
        group.add_argument(*names, dest=f.name, type=hint, choices=choices, default=None, help=text, **bare)


def _show(default) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(default, tuple):
        return " ".join(map(str, default)) or "none"
    if isinstance(default, dict):
        return ",".join(f"{k}={v}" for k, v in default.items()) or "none"
    return repr(default) if isinstance(default, str) else str(default)


def _key_values(text: str) -> dict:
    import yaml

    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = yaml.safe_load(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnntrain", description="Train convolutional image classifiers.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model", description="Train a model. Flags override --config.")
    p.add_argument("--config", "--recipe", dest="recipe", help="YAML recipe: a file or a packaged recipe name")
    add_config_flags(p)
    add_launch_flags(p)

    p = sub.add_parser("eval", help="evaluate a run, checkpoint or model.safetensors")
    p.add_argument("--checkpoint", "-m", help="run folder, checkpoint .pt or .safetensors")
    p.add_argument("--watch", metavar="RUN_DIR", help="score each new checkpoint of a run into its metrics.csv; "
                   "exit when the run writes summary.json")
    p.add_argument("--poll", type=float, default=10.0, help="--watch: seconds between looks")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="--watch: give up (exit 1) when no new checkpoint appears for this many seconds (0: never)")
    p.add_argument("--data-dir", help="where the data set is (default: as trained)")
    p.add_argument("--batch-size", "-b", type=int)
    p.add_argument("--device", "-c", choices=(*CHOICES["device"], *DEVICE_ALIASES))
    p.add_argument("--no-verify", dest="verify", action="store_false", default=None)
    p.add_argument("--confusion", action="store_true", help="also print the confusion matrix")
    p.add_argument("--calibrate", action="store_true", help="fit a temperature on the validation split and store "
                   "it in the run (calibration.json): predict then gives calibrated probabilities")

    p = sub.add_parser("models", help="list the models")
    p.add_argument("--family", help="only this family (e.g. torchvision, cifar, nnabla)")

    sub.add_parser("recipes", help="list the packaged recipes")

    p = sub.add_parser("report", help="compare runs: a table and a PNG of their validation curves")
    p.add_argument("runs", nargs="+", help="run folders, or one sweep folder")
    p.add_argument("--output", default=None, help="where to write the PNG (default: report.png; for a sweep "
                   "SWEEP_DIR/report.png)")

    p = sub.add_parser("sweep", help="hyperparameter search on Optuna, each trial a run folder",
                       description="Search hyperparameters as SPEC.yaml says (see cnntrain/sweep/spec.py); run "
                                   "again to finish a killed sweep.")
    p.add_argument("spec", help="sweep spec YAML: recipe, options, space, sampler, trials, metric, pruner")
    p.add_argument("--trials", type=int, help="trials in the study (default: the spec's)")
    p.add_argument("--parallel", type=int, default=1, help="trial processes at a time on this machine")
    p.add_argument("--sampler", choices=("tpe", "random", "grid"), help="default: the spec's (tpe)")
    p.add_argument("--storage", help="Optuna database URL (default: sqlite:///SWEEP_DIR/study.db)")
    p.add_argument("--sweep-dir", help="default: runs/sweep-<spec name>")
    p.add_argument("--threads", type=int, help="intra-op threads of each trial (sets the training option)")
    p.add_argument("--data-dir", help="the data set's folder for every trial (sets the training option)")
    p.add_argument("--timeout", type=float, default=0.0, help="give up after this many seconds (0: never)")

    p = sub.add_parser("data", help="download or verify official data set files")
    p.add_argument("action", choices=("download", "verify", "prepare"))
    p.add_argument("paths", nargs="*", help="prepare: SRC DEST; verify without --dataset: a shard folder")
    p.add_argument("--dataset", help="official data set to download / verify")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--shards", type=int, default=8, help="prepare: shards per split")
    p.add_argument("--resize", type=int, default=0, help="prepare: shrink the shorter side to this (0: keep)")
    p.add_argument("--format", choices=("tfrecord", "tar"), default="tfrecord", help="prepare: shard format")
    p.add_argument("--max-image-pixels", type=int, default=178_956_970,
                   help="refuse images with more pixels than this (decompression-bomb guard; 0: no limit)")
    _add_tool_parsers(sub)
    return parser


def _add_tool_parsers(sub) -> None:
    """predict / export / bench."""
    p = sub.add_parser("predict", help="top-k classes of images with a trained model")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--checkpoint", "-m", required=True, help="run folder, checkpoint .pt or .safetensors")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", "-c", default="cpu", choices=(*CHOICES["device"], *DEVICE_ALIASES))
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--tta", action="store_true", help="average the logits of each image and its mirror image")
    p.add_argument("--no-calibration", dest="calibrated", action="store_false",
                   help="ignore the temperature cnntrain eval --calibrate stored (raw softmax probabilities)")
    p.add_argument("--max-image-pixels", type=int, default=178_956_970,
                   help="refuse images with more pixels than this (decompression-bomb guard; 0: no limit)")

    p = sub.add_parser("export", help="export weights as safetensors or ONNX")
    p.add_argument("--checkpoint", "-m", required=True, help="run folder, checkpoint .pt or .safetensors")
    p.add_argument("--format", choices=("safetensors", "onnx", "h5"), required=True)
    p.add_argument("--output", "-O", required=True, help="file to write")

    p = sub.add_parser("bench", help="training or input-pipeline throughput")
    p.add_argument("--model", "-n", default="resnet50")
    p.add_argument("--batch-size", "-b", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--precision", choices=CHOICES["precision"], default="auto",
                   help="as cnntrain train (auto: bf16 where the device computes it natively)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first (its warm-up is untimed)")
    p.add_argument("--synthetic", action="store_true", help="random tensors (the default without --data-dir)")
    p.add_argument("--data-dir", help="an image folder (root/train/<class>/...): streamed as in training")
    p.add_argument("--data-only", action="store_true", help="time the input pipeline alone (decoded img/s)")
    p.add_argument("--image-size", type=int, default=0, help="crop side (default: the model's input size)")
    p.add_argument("--workers", type=int, default=-1, help="DataLoader workers (-1: auto)")
    p.add_argument("--decode", choices=CHOICES["decode"], default="host",
                   help="--data-dir: JPEGs decoded by the workers (host) or on the device (nvJPEG on CUDA)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: one per core)")
    p.add_argument("--device", "-c", default="auto", choices=(*CHOICES["device"], *DEVICE_ALIASES))
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def cmd_train(args: argparse.Namespace) -> int:
    from cnntrain.api import train

    options = {name: getattr(args, name) for name in config_field_names()}
    cfg = build_config(args.recipe, **options)  # bad flags fail here, before any worker starts
    if cfg.strategy == "async-ps":
        from cnntrain.parallel.ps.roles import train_async_ps

        return train_async_ps(cfg, args)
    if args.nproc_per_node:
        from cnntrain.parallel.env import is_launcher_child
        from cnntrain.parallel.launch import launch_local, strip_launch_flags

        if is_launcher_child():
            raise ConfigError("--nproc-per-node inside a job started by torchrun/mpirun/srun: drop one launcher")
        return launch_local(strip_launch_flags(args.argv), nproc=args.nproc_per_node, nnodes=args.nnodes,
                            node_rank=args.node_rank, master_addr=args.master_addr,
                            master_port=args.master_port, max_restarts=args.max_restarts)
    # Under mpirun/srun the rendezvous address comes from these flags (torchrun sets its own).
    if args.master_addr:
        os.environ["MASTER_ADDR"] = args.master_addr
    if args.master_port:
        os.environ["MASTER_PORT"] = str(args.master_port)
    train(cfg)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from cnntrain.api import evaluate, load_weights
    from cnntrain.engine.progress import setup_logging
    from cnntrain.parallel.env import detect_launch

    setup_logging()
    if args.watch:
        from cnntrain.watch import watch

        def show(step: int, r) -> None:
            print(f"step {step}: top-1 {100 * r.top1:.2f}% +- {100 * r.top1_stderr:.2f}  top-5 {100 * r.top5:.2f}%  "
                  f"loss {r.loss:.4f} ({r.count} images)", flush=True)

        watch(args.watch, poll=args.poll, timeout=args.timeout, on_result=show, data_dir=args.data_dir,
              batch_size=args.batch_size, device=args.device, verify=args.verify)
        return 0
    if not args.checkpoint:
        raise ConfigError("cnntrain eval needs --checkpoint (or --watch RUN_DIR)")
    _, cfg, meta = load_weights(args.checkpoint)
    overrides = dict(data_dir=args.data_dir, batch_size=args.batch_size, device=args.device, verify=args.verify)
    if args.calibrate:
        from cnntrain.api import calibrate

        fitted = calibrate(args.checkpoint, **overrides)
        print(f"temperature {fitted['temperature']:.4f}: {fitted['split']} NLL {fitted['nll_before']:.4f} -> "
              f"{fitted['nll_after']:.4f} ({fitted['images']} images); stored in {fitted['file']}")
    result = evaluate(args.checkpoint, calibrated=True, **overrides)
    if detect_launch().rank != 0:  # every rank holds the summed result; one report is enough
        return 0
    classes = meta.get("classes") or [str(i) for i in range(len(result.class_total))]
    print(f"{args.checkpoint}: {cfg.model} on {cfg.dataset} ({result.count} images)")
    print(f"top-1 {100 * result.top1:.2f}% +- {100 * result.top1_stderr:.2f}  top-5 {100 * result.top5:.2f}%  "
          f"loss {result.loss:.4f}")
    _report_eval(args.checkpoint, result, classes, f"{cfg.dataset} / {cfg.model}")
    width = max(len(c) for c in classes)
    if args.confusion and result.confusion:
        for name, row in zip(classes, result.confusion):
            print(f"  {name:<{width}} " + " ".join(f"{v:5d}" for v in row))
    return 0


def _report_eval(checkpoint: str, result, classes: list[str], title: str) -> None:
    """Per-class precision / recall / F1 and ECE printed; the files in the run folder's eval/."""
    from cnntrain.api import eval_folder
    from cnntrain.engine.classification_metrics import format_scores, write_eval_report

    print("\n".join(format_scores(result, classes)))
    folder = eval_folder(checkpoint)
    report = write_eval_report(folder, result, classes, title, extra={"weights": str(checkpoint)})
    print(f"macro F1 {100 * report['macro_f1']:.2f}%  weighted F1 {100 * report['weighted_f1']:.2f}%  "
          f"ECE {100 * report['ece']:.2f}%  ({folder}: confusion.csv, confusion.png, reliability.png, metrics.json)")


def cmd_models(args: argparse.Namespace) -> int:
    import torch

    from cnntrain.models import count_parameters, create_model, list_models

    specs = [s for s in list_models() if not args.family or s.family == args.family]
    print(f"{'name':<28} {'family':<12} {'parameters':>12}  {'input':<12} recipe")
    for spec in specs:
        with torch.device("meta"):  # count without allocating (ViT-H has 600M+ parameters)
            try:
                n = f"{count_parameters(create_model(spec.name, 10 if spec.input_size[1] <= 64 else 1000)):,}"
            except Exception:  # noqa: BLE001 - a model that cannot build on meta still gets listed
                n = "?"
        size = "x".join(map(str, spec.input_size))
        print(f"{spec.name:<28} {spec.family:<12} {n:>12}  {size:<12} {spec.recipe or ''}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from cnntrain.config import RECIPE_DIR

    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        first = next((ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        print(f"{path.stem:<28} {first}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from cnntrain.data.official import download_dataset, verify_dataset
    from cnntrain.engine.progress import setup_logging

    setup_logging()
    if args.action == "prepare":
        from cnntrain.data.prepare import prepare

        if len(args.paths) != 2:
            raise ConfigError("usage: cnntrain data prepare SRC DEST [--shards N] [--resize S] [--format F]")
        result = prepare(*args.paths, shards=args.shards, resize=args.resize, fmt=args.format,
                         max_pixels=args.max_image_pixels)
        counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
        print(f"{result.dest}: {counts} images in {len(result.shards)} shards; {result.skipped} unreadable skipped")
        return 0
    if args.action == "verify" and not args.dataset:
        from cnntrain.data.prepare import verify

        rows = verify(args.paths[0] if args.paths else args.data_dir)
        for row in rows:
            print(f"{'ok' if not row.error else 'CORRUPT':<8} {row.records:>8} {row.path}"
                  + (f"\n         {row.error}" if row.error else ""))
        bad = sum(1 for r in rows if r.error)
        print(f"{sum(r.records for r in rows)} records in {len(rows)} shards, {bad} corrupt")
        return 1 if bad else 0
    if not args.dataset:
        raise ConfigError(f"cnntrain data {args.action} needs --dataset")
    if args.action == "download":
        for path in download_dataset(args.dataset, args.data_dir):
            print(f"ok  {path}")
    else:
        for path, status in verify_dataset(args.dataset, args.data_dir):
            print(f"{status:<8} {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cnntrain.report import report
    from cnntrain.sweep.report import is_sweep, sweep_report

    if len(args.runs) == 1 and is_sweep(args.runs[0]):
        print(sweep_report(args.runs[0], args.output))
        return 0
    output = args.output or "report.png"
    print(report(args.runs, output))
    print(f"curves: {output}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from cnntrain.sweep.driver import run_sweep
    from cnntrain.sweep.report import sweep_report

    if args.parallel < 1:
        raise ConfigError("--parallel must be at least 1")
    extra = {"options": None}
    local = {k: v for k, v in (("threads", args.threads), ("data_dir", args.data_dir)) if v}
    if local:  # options that may differ between machines or runs of one sweep
        from cnntrain.sweep.spec import load_spec

        extra["options"] = {**load_spec(args.spec).options, **local}
    folder = run_sweep(args.spec, sweep_dir=args.sweep_dir, parallel=args.parallel, timeout=args.timeout,
                       trials=args.trials, sampler=args.sampler, storage=args.storage, **extra)
    print(sweep_report(folder))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from cnntrain.predict import predict

    results = predict(args.checkpoint, args.inputs, top_k=args.top_k,
                      device=DEVICE_ALIASES.get(args.device, args.device), max_image_pixels=args.max_image_pixels,
                      tta=args.tta, calibrated=args.calibrated)
    for r in results:
        if args.json:
            print(json.dumps({"path": str(r.path), "top": r.top, "error": r.error}))
        elif r.error:
            print(f"{r.path}: {r.error}")
        else:
            print(f"{r.path}: " + ", ".join(f"{name} {100 * p:.1f}%" for name, p in r.top))
    return 1 if any(r.error for r in results) else 0


def cmd_export(args: argparse.Namespace) -> int:
    from cnntrain.export import export

    print(export(args.checkpoint, args.format, args.output))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from cnntrain.bench import bench

    result = bench(args.model, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                   precision=args.precision, data_dir=args.data_dir, data_only=args.data_only,
                   device=DEVICE_ALIASES.get(args.device, args.device), image_size=args.image_size,
                   workers=args.workers, threads=args.threads, decode=args.decode, compile=args.compile)
    print(result.to_json() if args.json else result.describe())
    return 0


COMMANDS = {"report": cmd_report, "train": cmd_train, "eval": cmd_eval, "models": cmd_models, "recipes": cmd_recipes,
            "data": cmd_data, "sweep": cmd_sweep, "predict": cmd_predict, "export": cmd_export, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc-per-node hands its workers
    try:
        return COMMANDS[args.command](args)
    except CnnTrainError as exc:
        if args.debug:
            raise
        print(f"cnntrain: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cnntrain: interrupted", file=sys.stderr)
        return 130
