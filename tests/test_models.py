"""Model registry and families: shapes, exact parameter counts, backward, torchvision zoo."""

from __future__ import annotations

import pytest
import torch

from cnntrain.errors import ConfigError
from cnntrain.models import count_parameters, create_model, get_spec, list_models

# Exact parameter counts with 10 classes (BatchNorm affine parameters included).
PARAMS = {
    "resnet23": 97_482,  # NNabla CIFAR-10 ResNet-23, bias-free convolutions
    "resnet23-c100": 3_380_362,
    "resnet20": 269_722,  # option A (parameter-free shortcuts)
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "simplecnn": 1_756_426,
    "cnn": 431_080,
    "mlp": 79_510,
    "lenet": 61_706,
    "trivial": 150_549,
    "singa-alexnet": 23_490_378,
    "xception": 20_827_442,  # equals Cadene's Xception (22,855,952 at 1000 classes) at 10 classes
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_model_shape_params_and_backward(name: str) -> None:
    spec = get_spec(name)
    model = create_model(name, num_classes=10)
    assert count_parameters(model) == PARAMS[name]
    out = model(torch.randn(2, *spec.input_size))
    assert out.shape == (2, 10)
    out.logsumexp(dim=1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_resnet23_sizes() -> None:
    assert 95_000 <= PARAMS["resnet23"] <= 100_000  # "about 97k" in NNabla's README
    model = create_model("resnet23-c100", num_classes=100)
    assert count_parameters(model) == 3_415_012
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_resnet_cifar_option_b_projections() -> None:
    model = create_model("resnet20", num_classes=10, shortcut="B")
    assert count_parameters(model) == 272_474  # + 2 projections (1x1 conv + BN) = 2,752
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match="shortcut"):
        create_model("resnet20", num_classes=10, shortcut="C")


def test_other_image_sizes_and_channels() -> None:
    x = torch.randn(2, 3, 32, 32)
    assert create_model("cnn", 10, in_channels=3, image_size=32)(x).shape == (2, 10)
    assert create_model("mlp", 10, in_channels=3, image_size=32)(x).shape == (2, 10)
    assert create_model("lenet", 10, in_channels=3, image_size=(32, 32))(x).shape == (2, 10)
    assert create_model("simplecnn", 10, image_size=24, lrn=True)(x[..., :24, :24]).shape == (2, 10)
    assert create_model("resnet23", 10, in_channels=1)(x[:, :1]).shape == (2, 10)
    with pytest.raises(ConfigError, match="act"):
        create_model("resnet23", 10, act="gelu")


# (name, input side, kwargs): small inputs where the architecture allows them.
ZOO_CASES = [
    ("resnet18", 64, {}),
    ("googlenet", 64, {}),
    ("mobilenet_v3_small", 64, {}),
    ("vgg11", 32, {}),
    ("inception_v3", 75, {}),  # 75x75 is the smallest input it accepts
    ("inception_v3", 299, {"aux_logits": True}),  # the aux head needs the full 17x17 grid
]


@pytest.mark.parametrize(("name", "side", "kwargs"), ZOO_CASES)
def test_torchvision_zoo_train_forward(name: str, side: int, kwargs: dict) -> None:
    model = create_model(name, num_classes=10, **kwargs).train()
    out = model(torch.randn(2, 3, side, side))
    if kwargs.get("aux_logits"):
        logits, aux = out  # InceptionOutputs(logits, aux_logits) in train mode
        assert aux.shape == (2, 10)
    else:
        assert isinstance(out, torch.Tensor)
        logits = out
    assert logits.shape == (2, 10)


def test_torchvision_zoo_channels_and_kwargs() -> None:
    model = create_model("resnet18", num_classes=10, in_channels=1)
    assert count_parameters(model) == 11_181_642 - 2 * 64 * 7 * 7
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)
    with pytest.raises(ConfigError, match="give pretrained weights with --pretrained"):
        create_model("resnet18", num_classes=10, weights="IMAGENET1K_V1")
    with pytest.raises(ConfigError, match="resnet18"):
        create_model("resnet18", num_classes=10, no_such_option=1)


def test_registry_listing() -> None:
    specs = {s.name: s for s in list_models()}
    assert set(PARAMS) <= set(specs)
    zoo = [s for s in specs.values() if s.family == "torchvision"]
    assert len(zoo) >= 60
    for name in ("resnet50", "resnext50_32x4d", "wide_resnet50_2", "vgg16_bn", "googlenet", "alexnet",
                 "densenet121", "mobilenet_v2", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny",
                 "vit_b_16", "swin_t"):
        assert specs[name].family == "torchvision"
    assert specs["singa-alexnet"].family == "singa"
    for spec in specs.values():
        assert len(spec.input_size) == 3 and all(isinstance(v, int) and v > 0 for v in spec.input_size)
    assert specs["inception_v3"].input_size == (3, 299, 299)
    assert specs["resnet50"].input_size == (3, 224, 224)
    assert specs["vit_h_14"].input_size == (3, 224, 224)  # what weights=None builds
    assert specs["xception"].input_size == (3, 299, 299)


def test_unknown_model_suggests_a_name() -> None:
    with pytest.raises(ConfigError, match="did you mean 'xception'"):
        create_model("xceptoin", num_classes=10)
    with pytest.raises(ConfigError, match="unknown model"):
        get_spec("no-such-network-at-all")


def test_fastnet_whitening_decorrelates_patches():
    import torch

    from cnntrain.models import create_model

    net = create_model("fastnet", 10)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 1, 16, 16, generator=g)
    images = torch.cat([base, 0.7 * base + 0.3 * torch.randn(64, 1, 16, 16, generator=g),
                        torch.randn(64, 1, 16, 16, generator=g)], dim=1)  # correlated channels
    net.init_from_data(images)
    out = net.whiten(images)[:, :12] - net.whiten.bias[:12, None, None]  # first half: the eigen-filters
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = torch.cov(flat.T)
    assert torch.allclose(cov, torch.eye(12), atol=0.05)
    assert not net.whiten.weight.requires_grad
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_torchvision_is_imported_only_when_one_of_its_models_is_asked_for():
    """Importing torchvision costs about 1.5 s of every start (it imports torch._dynamo): the CIFAR
    models start without it, and its models are still found by name, by the listing and in
    did-you-mean suggestions."""
    import subprocess
    import sys

    code = ("import sys; from cnntrain.models import create_model, get_spec, list_models\n"
            "create_model('resnet20', 10); before = 'torchvision' in sys.modules\n"
            "family = get_spec('resnet18').family\n"
            "print(before, family, 'torchvision' in sys.modules, len(list_models()) > 60)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "torchvision", "True", "True"], out.stderr[-2000:]
    with pytest.raises(ConfigError, match="did you mean 'resnet18'"):
        get_spec("resnt18")
