"""Published weights: torchvision's through its weights API (served from 127.0.0.1, hash-checked in the
hub cache), timm's through timm's loader (a local file, an offline Hugging Face cache), and a run
fine-tuned from them predicting and exporting with their preprocessing."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models._api import Weights, WeightsEnum
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

import cnntrain
from cnntrain.engine.finetune import pretrained_state
from cnntrain.errors import ConfigError
from cnntrain.export import export
from cnntrain.models import pretrained
from cnntrain.predict import predict
from tests.fixtures import write_image_folder
from tests.helpers import tiny, weights

MODEL = "squeezenet1_1"  # 1.2 M parameters: a 5 MB weights file
MEAN, STD = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[Path, dict]:
    """A squeezenet state dict as torchvision publishes one: ``<name>-<sha256 prefix>.pth``."""
    folder = tmp_path_factory.mktemp("published")
    torch.manual_seed(7)
    state = torchvision.models.get_model(MODEL, weights=None).state_dict()
    raw = folder / "raw.pth"
    torch.save(state, raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    path = folder / f"{MODEL}-{digest[:8]}.pth"
    raw.rename(path)
    return path, state


@pytest.fixture
def fake_enum(published, monkeypatch):
    """torchvision's weights enum of MODEL with one entry whose file is ``published`` (its real
    entries' files cannot be made offline: their names carry the hash of the real weights)."""
    path, _ = published

    class FakeWeights(WeightsEnum):
        IMAGENET1K_V1 = Weights(url=f"https://download.pytorch.org/models/{path.name}",
                                transforms=functools.partial(ImageClassification, crop_size=48, resize_size=56,
                                                             mean=MEAN, std=STD,
                                                             interpolation=InterpolationMode.BICUBIC),
                                meta={"categories": [str(i) for i in range(1000)]})
        DEFAULT = IMAGENET1K_V1

    real = torchvision.models.get_model_weights
    monkeypatch.setattr(torchvision.models, "get_model_weights",
                        lambda name: FakeWeights if name == MODEL else real(name))
    return FakeWeights


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(pretrained.MIRROR_ENV, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def server(published):
    """An HTTP server on 127.0.0.1 serving the published file's folder; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(published[0].parent))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_weights_come_from_the_mirror_once_then_from_the_checked_cache(fake_enum, hub, server, published,
                                                                      monkeypatch):
    path, state = published
    monkeypatch.setenv(pretrained.MIRROR_ENV, server)
    loaded, source = pretrained.torchvision_state(MODEL, "DEFAULT")
    assert Path(source) == hub / path.name and (hub / path.name).read_bytes() == path.read_bytes()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    monkeypatch.setenv(pretrained.MIRROR_ENV, "http://127.0.0.1:9/")  # nothing listens: the cache must do
    again, _ = pretrained.torchvision_state(MODEL, "IMAGENET1K_V1")
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_a_damaged_cached_file_is_refused_by_name(fake_enum, hub, published):
    path, _ = published
    hub.mkdir(parents=True)
    damaged = hub / path.name
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="damaged or swapped") as err:
        pretrained.torchvision_state(MODEL, "DEFAULT")
    assert str(damaged) in str(err.value)


def test_a_download_with_the_wrong_hash_is_refused_and_not_kept(fake_enum, hub, server, published, tmp_path,
                                                               monkeypatch):
    path, _ = published
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / path.name).write_bytes(path.read_bytes() + b"\0")
    handler = functools.partial(_QuietHandler, directory=str(swapped))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv(pretrained.MIRROR_ENV, f"http://127.0.0.1:{httpd.server_address[1]}")
        with pytest.raises(ConfigError, match="did not match the sha256 prefix"):
            pretrained.torchvision_state(MODEL, "DEFAULT")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
    assert not (hub / path.name).exists()


def test_offline_the_error_names_the_url_the_file_and_the_folder(fake_enum, hub, published, monkeypatch):
    path, _ = published
    monkeypatch.setenv(pretrained.MIRROR_ENV, "http://127.0.0.1:9/models")
    with pytest.raises(ConfigError) as err:
        pretrained.torchvision_state(MODEL, "DEFAULT")
    text = str(err.value)
    assert f"http://127.0.0.1:9/models/{path.name}" in text and f"named {path.name}" in text and str(hub) in text


def test_unknown_tags_and_models_without_weights_are_refused():
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        pretrained.torchvision_weights("resnet18", "IMAGENET1K_V9")
    with pytest.raises(ConfigError, match="no weights"):
        pretrained.torchvision_weights("no_such_net", "DEFAULT")


def test_a_pretrained_run_uses_the_weights_preprocessing_and_predicts_and_exports_with_it(
        fake_enum, hub, server, published, tmp_path, monkeypatch, caplog):
    path, state = published
    monkeypatch.setenv(pretrained.MIRROR_ENV, server)
    data = tmp_path / "photos"
    write_image_folder(data, classes=("ant", "bee", "wasp"), per_class=4, size=(70, 60))
    write_image_folder(data, classes=("ant", "bee", "wasp"), per_class=1, size=(70, 60), split="val")
    caplog.set_level("INFO", logger="cnntrain")
    result = cnntrain.train(tiny(tmp_path / "run", dataset="folder", data_dir=str(data), pipeline="stream", workers=0,
                                 model=MODEL, pretrained="DEFAULT", freeze="backbone", max_steps=2, batch_size=4,
                                 lr=0.01))
    final = weights(result.run_dir)
    backbone = [k for k in state if not k.startswith("classifier.1.")]
    assert all(torch.equal(final[k], state[k]) for k in backbone)  # frozen at the published values
    assert final["classifier.1.weight"].shape[0] == 3  # a new head for three classes
    table = (result.run_dir / "init_weights.txt").read_text()
    assert "re-initialised   classifier.1.weight (shape [1000, 512, 1, 1] in the file, [3, 512, 1, 1] here)" in table
    start = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fine-tuning:")]
    assert start and "mean 0.400,0.450,0.500 std 0.200,0.250,0.300, resize 56 crop 48 bicubic" in start[0]
    meta = cnntrain.load_weights(result.run_dir / "model.safetensors")[2]
    assert tuple(meta["mean"]) == pytest.approx(MEAN) and meta["input_shape"] == [3, 48, 48]
    assert (meta["eval_resize"], meta["interpolation"]) == (56, "bicubic")  # the weights' own evaluation resize
    predictions = predict(result.run_dir, [data / "val"], top_k=2)
    assert len(predictions) == 3 and all(not p.error and len(p.top) == 2 for p in predictions)
    assert cnntrain.evaluate(result.run_dir).count == 3  # at the weights' crop size and mean / std
    exported = export(result.run_dir, "safetensors", tmp_path / "out.safetensors")
    assert cnntrain.load_weights(exported)[2]["mean"] == meta["mean"]


# ------------------------------------------------------------------------------------------------- timm
timm = pytest.importorskip("timm")
TIMM_ARCH, TIMM_TAG = "test_resnet", "r160_in1k"


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory) -> tuple[Path, dict]:
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("timm")
    torch.manual_seed(3)
    state = timm.create_model(TIMM_ARCH, pretrained=False).state_dict()
    path = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, state


def _hf_cache(root: Path, weights_file: Path) -> Path:
    """The Hugging Face hub cache layout holding ``timm/<arch>.<tag>``'s model.safetensors."""
    repo = root / f"models--timm--{TIMM_ARCH}.{TIMM_TAG}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(weights_file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def test_timm_weights_load_from_an_offline_hub_cache_with_a_new_head(timm_weights, tmp_path, monkeypatch):
    from huggingface_hub import constants

    path, state = timm_weights
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(_hf_cache(tmp_path / "hub", path)))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = cnntrain.train(tiny(tmp_path / "run", model=f"timm/{TIMM_ARCH}", pretrained="DEFAULT",
                                 synthetic_shape=[3, 32, 32], synthetic_classes=4, freeze="backbone", max_steps=2,
                                 batch_size=8))
    final = weights(result.run_dir)
    assert final["fc.weight"].shape[0] == 4
    assert all(torch.equal(final[k], state[k]) for k in state if not k.startswith("fc."))
    meta = cnntrain.load_weights(result.run_dir / "model.safetensors")[2]
    assert tuple(meta["mean"]) == pytest.approx((0.5, 0.5, 0.5))  # test_resnet's pretrained config


def test_timm_weights_from_a_local_file(timm_weights, tmp_path):
    path, state = timm_weights
    from cnntrain.models import create_model
    from cnntrain.models.pretrained import load_matching

    loaded, source = pretrained_state(f"timm/{TIMM_ARCH}", str(path))
    assert str(path) in source and all(torch.equal(loaded[k], state[k]) for k in state)
    model = create_model(f"timm/{TIMM_ARCH}", num_classes=5)
    table = load_matching(model, loaded, source)
    assert set(table.reinitialised) == {"fc.weight", "fc.bias"} and not table.unused.keys() - {"fc.weight", "fc.bias"}


def test_timm_offline_without_the_weights_says_where_they_belong(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as err:
        pretrained_state(f"timm/{TIMM_ARCH}", "DEFAULT")
    assert f"timm/{TIMM_ARCH}.{TIMM_TAG}" in str(err.value) and str(tmp_path / "empty") in str(err.value)


def test_unknown_timm_names_are_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match="unknown timm model 'resnet1888'.*resnet18"):
        cnntrain.create_model("timm/resnet1888", num_classes=2)
