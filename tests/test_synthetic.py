"""Synthetic data: deterministic, balanced, the requested shape (by default the model's), and learnable."""

from __future__ import annotations

import json

import pytest
import torch

from cnntrain.config import build_config
from cnntrain.data.datasets import load_data
from cnntrain.data.synthetic import make_synthetic
from cnntrain.errors import ConfigError
from cnntrain.models import get_spec
from tests.helpers import run_cli


def test_shape_dtype_balance() -> None:
    data = make_synthetic(103, shape=(1, 28, 20), num_classes=10)
    assert data.images.shape == (103, 1, 28, 20) and data.images.dtype == torch.uint8
    assert data.labels.bincount().tolist() == [11, 11, 11] + [10] * 7
    assert data.classes == [f"class{i}" for i in range(10)] and data.num_classes == 10


def test_deterministic_from_seed() -> None:
    a, b, c = make_synthetic(64, seed=3), make_synthetic(64, seed=3), make_synthetic(64, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_learnable_by_nearest_class_mean() -> None:
    # Class means estimated on one half classify the other half: a CNN has far more to go on.
    data = make_synthetic(1000, shape=(3, 16, 16), num_classes=10, seed=0)
    x, y = data.images.flatten(1).float(), data.labels
    means = torch.stack([x[:500][y[:500] == k].mean(0) for k in range(10)])
    accuracy = (torch.cdist(x[500:], means).argmin(1) == y[500:]).float().mean()
    assert accuracy > 0.9
    # ... but no single pixel gives the class away: noise is large next to the class differences.
    assert data.images.float().std() > 30


def test_large_images_and_many_classes() -> None:
    data = make_synthetic(6, shape=(3, 224, 224), num_classes=1000)
    assert data.images.shape == (6, 3, 224, 224) and int(data.labels.max()) < 1000


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(n=4, num_classes=0), dict(n=4, shape=(32, 32)),
                                    dict(n=4, shape=(3, 0, 8))])
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        make_synthetic(**kwargs)


# ------------------------------------------------------------------ the size follows the model


@pytest.mark.parametrize("model, shape", [("inception_v3", (3, 299, 299)), ("lenet", (1, 28, 28)),
                                          ("resnet20", (3, 32, 32))])
def test_synthetic_images_take_the_models_input_size(model, shape) -> None:
    cfg = build_config(dataset="synthetic", model=model, synthetic_size=4)
    data = load_data(cfg, input_size=get_spec(model).input_size)
    assert data.shape == shape and data.val.shape == shape


def test_image_size_or_an_explicit_shape_overrides_the_model() -> None:
    resnet = get_spec("resnet20").input_size
    sized = build_config(dataset="synthetic", model="resnet20", synthetic_size=4, image_size=40)
    assert load_data(sized, input_size=resnet).shape == (3, 40, 40)
    assert load_data(build_config(dataset="synthetic", model="lenet", synthetic_size=4, image_size=20),
                     input_size=get_spec("lenet").input_size).shape == (1, 20, 20)  # the model's channels
    shaped = build_config(dataset="synthetic", model="resnet20", synthetic_size=4, synthetic_shape=[1, 28, 28],
                          image_size=40)
    assert load_data(shaped, input_size=resnet).shape == (1, 28, 28)
    assert load_data(build_config(dataset="synthetic", synthetic_size=4)).shape == (3, 32, 32)  # no model given
    with pytest.raises(ConfigError, match="--synthetic-shape needs C H W"):
        load_data(build_config(dataset="synthetic", synthetic_shape=[32, 32]), input_size=resnet)


def test_nvcnn_inception3_trains_two_steps_on_synthetic_299px_images(tmp_path) -> None:
    # The recipe's own command (its 299-px model, its fp16 on CUDA); on CPU in bf16, since fp16 autocast
    # has no fast CPU kernels (167 s instead of 7 s for these two steps here).
    precision = [] if torch.cuda.is_available() else ["--precision", "bf16"]
    out = run_cli("train", "--config", "nvcnn-inception3", "--dataset", "synthetic", "--max-steps", "2", "-b", "2",
                  "--synthetic-size", "4", "--threads", "2", "--progress", "none", "--run-dir", str(tmp_path / "r"),
                  *precision, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "inception_v3" in out.stderr and "done: 2 steps" in out.stderr
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 2
