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
import inspect
import logging
import re
import sys
import typing

from cnntrain.config import CHOICES, DEVICE_ALIASES, TrainConfig, build_config
from cnntrain.errors import CnnTrainError

log = logging.getLogger("cnntrain")

SHORT = {"model": ["-n"], "batch_size": ["-b"], "epochs": ["-e"], "lr": ["-l"], "device": ["-c"],
         "run_dir": ["-o", "--monitor-path"], "max_steps": ["-i"]}


def _field_help() -> dict[str, str]:
    """The trailing comment of each TrainConfig field is its --help text (one source of truth)."""
    helps = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
        if m:
            helps[m.group(1)] = m.group(2)
    return helps


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, default None so a recipe's value stands unless given."""
    helps = _field_help()
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        names = [*SHORT.get(f.name, []), flag]
        hint = hints[f.name]
        text = f"{helps.get(f.name, '')} [default: {getattr(defaults, f.name)!r}]"
        if hint is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=text)
        elif typing.get_origin(hint) is list:
            item = typing.get_args(hint)[0]
            parser.add_argument(*names, dest=f.name, nargs="+", type=item, default=None, help=text)
        elif typing.get_origin(hint) is dict:
            parser.add_argument(*names, dest=f.name, type=_key_values, default=None,
                                help=f"{text}; as key=value,key=value")
        else:
            choices = CHOICES.get(f.name)
            if f.name == "device":
                choices = (*choices, *DEVICE_ALIASES)
            parser.add_argument(*names, dest=f.name, type=hint, choices=choices, default=None, help=text)


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

    p = sub.add_parser("eval", help="evaluate a run, checkpoint or model.safetensors")
    p.add_argument("--checkpoint", "-m", required=True, help="run folder, checkpoint .pt or .safetensors")
    p.add_argument("--data-dir", help="where the data set is (default: as trained)")
    p.add_argument("--batch-size", "-b", type=int)
    p.add_argument("--device", "-c", choices=(*CHOICES["device"], *DEVICE_ALIASES))
    p.add_argument("--no-verify", dest="verify", action="store_false", default=None)
    p.add_argument("--confusion", action="store_true", help="also print the confusion matrix")

    p = sub.add_parser("models", help="list the models")
    p.add_argument("--family", help="only this family (e.g. torchvision, cifar, nnabla)")

    sub.add_parser("recipes", help="list the packaged recipes")

    p = sub.add_parser("report", help="compare runs: a table and a PNG of their validation curves")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--output", default="report.png", help="where to write the PNG")

    p = sub.add_parser("data", help="download or verify official data set files")
    p.add_argument("action", choices=("download", "verify"))
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", default="data")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from cnntrain.engine.trainer import train

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    train(build_config(args.recipe, **options))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from cnntrain.api import evaluate, load_weights
    from cnntrain.engine.progress import setup_logging

    setup_logging()
    _, cfg, meta = load_weights(args.checkpoint)
    result = evaluate(args.checkpoint, data_dir=args.data_dir, batch_size=args.batch_size,
                      device=args.device, verify=args.verify)
    classes = meta.get("classes") or [str(i) for i in range(len(result.class_total))]
    print(f"{args.checkpoint}: {cfg.model} on {cfg.dataset} ({result.count} images)")
    print(f"top-1 {100 * result.top1:.2f}% +- {100 * result.top1_stderr:.2f}  top-5 {100 * result.top5:.2f}%  "
          f"loss {result.loss:.4f}")
    width = max(len(c) for c in classes)
    for name, acc, total in zip(classes, result.per_class(), result.class_total):
        print(f"  {name:<{width}}  {100 * acc:6.2f}%  ({total} images)")
    if args.confusion and result.confusion:
        for name, row in zip(classes, result.confusion):
            print(f"  {name:<{width}} " + " ".join(f"{v:5d}" for v in row))
    return 0


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
    if args.action == "download":
        for path in download_dataset(args.dataset, args.data_dir):
            print(f"ok  {path}")
    else:
        for path, status in verify_dataset(args.dataset, args.data_dir):
            print(f"{status:<8} {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cnntrain.report import report

    print(report(args.runs, args.output))
    print(f"curves: {args.output}")
    return 0


COMMANDS = {"report": cmd_report, "train": cmd_train, "eval": cmd_eval, "models": cmd_models, "recipes": cmd_recipes,
            "data": cmd_data}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
