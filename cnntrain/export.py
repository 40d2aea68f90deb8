"""``cnntrain export``: a trained model as safetensors or ONNX.

    cnntrain export --checkpoint runs/a --format safetensors --output model.safetensors
    cnntrain export --checkpoint runs/a --format onnx --output model.onnx      # batch dimension dynamic
    cnntrain export --checkpoint runs/a --format h5 --output params.h5         # NNabla-style parameter file

The ONNX graph takes normalised float images [N, C, H, W] (the same input the PyTorch model takes)
and returns the main logits; the class names, mean and std go into its metadata so a consumer can
prepare images and name the outputs.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from cnntrain.api import load, load_weights
from cnntrain.engine.run import export_safetensors
from cnntrain.errors import CheckpointError, ConfigError

FORMATS = ("safetensors", "onnx", "h5")


class _MainLogits(nn.Module):
    """Inception/GoogLeNet return namedtuples in some modes; ONNX needs one plain output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out if isinstance(out, torch.Tensor) else out[0]


def export(checkpoint: str | os.PathLike, fmt: str, output: str | os.PathLike, *, opset: int = 17) -> Path:
    """Write the weights of ``checkpoint`` (run folder, .pt or .safetensors) to ``output`` as ``fmt``."""

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    _, cfg, meta = load_weights(checkpoint)
    model = load(checkpoint, "cpu")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "model": cfg.model, "config": cfg.to_dict()}
    if fmt == "safetensors":
        return export_safetensors(model, output, meta)
    if fmt == "h5":
        return export_h5(model, output, meta)
    shape = tuple(meta.get("input_shape") or (3, 224, 224))
    try:
        import onnx
    except ImportError:
        raise ConfigError("ONNX export needs the onnx package: pip install 'cnntrain[onnx]'") from None
    tmp = output.with_name(f".{output.name}.tmp")
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated but needs no onnxscript; it is what works offline.
        warnings.simplefilter("ignore")
        torch.onnx.export(_MainLogits(model).eval(), torch.zeros(1, *shape), str(tmp), dynamo=False,
                          input_names=["images"], output_names=["logits"], opset_version=opset,
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    graph = onnx.load(str(tmp))
    for key in ("classes", "mean", "std", "input_shape", "model"):
        if meta.get(key) is not None:
            graph.metadata_props.add(key=key, value=json.dumps(meta[key]))
    try:
        onnx.checker.check_model(graph)
    except onnx.checker.ValidationError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"ONNX export of {cfg.model} is invalid: {exc}") from None
    onnx.save(graph, str(tmp))
    tmp.replace(output)
    return output


def export_h5(model: nn.Module, output: Path, meta: dict) -> Path:
    """Write every parameter and buffer as an HDF5 dataset at its module path (``layer1/0/conv1/weight``),
    the layout NNabla's ``save_parameters`` uses: attributes ``need_grad`` and ``index`` (the order),
    and the run's classes, mean, std and model name as JSON attributes of the root."""
    try:
        import h5py
    except ImportError:
        raise ConfigError("HDF5 export needs the h5py package: pip install 'cnntrain[h5]'") from None
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    tmp = output.with_name(f".{output.name}.tmp")
    with h5py.File(tmp, "w") as f:
        for index, (name, tensor) in enumerate(model.state_dict().items()):
            data = f.create_dataset(name.replace(".", "/"), data=tensor.detach().cpu().numpy())
            data.attrs["need_grad"] = name in trainable
            data.attrs["index"] = index
        for key in ("classes", "mean", "std", "input_shape", "model"):
            if meta.get(key) is not None:
                f.attrs[key] = json.dumps(meta[key])
    tmp.replace(output)
    return output
