"""``cnntrain predict`` and ``cnntrain export`` (safetensors, and ONNX checked with onnxruntime)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import cnntrain
from cnntrain.cli import main
from cnntrain.errors import ConfigError, DataError
from cnntrain.export import export
from cnntrain.predict import predict, prepare_image
from tests.fixtures import jpeg_bytes, png_claiming, write_image_folder
from tests.helpers import tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predict")
    write_image_folder(root / "data", classes=("cat", "dog", "owl"), per_class=4, size=(32, 32))
    write_image_folder(root / "data", classes=("cat", "dog", "owl"), per_class=2, size=(32, 32), split="val")
    result = cnntrain.train(tiny(root / "run", dataset="folder", data_dir=str(root / "data"), model="resnet20",
                                 max_steps=2, batch_size=4))
    return result.run_dir


def test_predict_folder_gives_named_top_k(run: Path, tmp_path: Path) -> None:
    data = run.parent / "data" / "val"
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    results = predict(run, [data, tmp_path / "junk.jpg"], top_k=2)
    assert len(results) == 7
    for r in results[:6]:
        assert not r.error and len(r.top) == 2 and {n for n, _ in r.top} <= {"cat", "dog", "owl"}
        assert r.top[0][1] >= r.top[1][1] and 0 < sum(p for _, p in r.top) <= 1 + 1e-6
    assert "not a readable image" in results[6].error
    with pytest.raises(DataError, match="neither"):
        predict(run, [tmp_path / "missing.png"])


def test_predict_refuses_images_over_the_pixel_limit_by_name(run: Path, tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(png_claiming(50000, 50000))
    (tmp_path / "photo.jpg").write_bytes(jpeg_bytes((64, 48)))
    bomb, photo = predict(run, [tmp_path], top_k=1)
    assert "bomb.png: the image has 2,500,000,000 pixels" in bomb.error and "--max-image-pixels" in bomb.error
    assert not bomb.top and not photo.error and len(photo.top) == 1
    (limited,) = predict(run, [tmp_path / "photo.jpg"], max_image_pixels=3000)
    assert "photo.jpg: the image is 64x48 (3,072 pixels), over the limit of 3,000" in limited.error
    with pytest.raises(DataError, match="over the limit of 100 pixels"):
        prepare_image(tmp_path / "photo.jpg", (3, 32, 32), max_pixels=100)


def test_predict_cli(run: Path, capsys) -> None:
    image = next((run.parent / "data" / "val" / "owl").iterdir())
    assert main(["predict", str(image), "--checkpoint", str(run), "--top-k", "3", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["path"] == str(image) and len(row["top"]) == 3


def test_export_safetensors_loads_back(run: Path, tmp_path: Path) -> None:
    out = export(run, "safetensors", tmp_path / "w.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(cnntrain.load(out)(x), cnntrain.load(run)(x))
    assert cnntrain.load(out).classes == ["cat", "dog", "owl"]
    with pytest.raises(ConfigError, match="--format"):
        export(run, "tflite", tmp_path / "w.tflite")


def test_onnx_matches_pytorch(run: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 0
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)  # batch 3: the batch dimension is dynamic
    (ours,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        theirs = cnntrain.load(run)(x).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    meta = {p.key: p.value for p in __import__("onnx").load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["classes"]) == ["cat", "dog", "owl"]


def test_export_h5_holds_every_tensor_at_its_module_path(run: Path, tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    out = tmp_path / "params.h5"
    assert main(["export", "--checkpoint", str(run), "--format", "h5", "--output", str(out)]) == 0
    state = cnntrain.load(run).state_dict()
    with h5py.File(out, "r") as f:
        for index, (name, tensor) in enumerate(state.items()):
            data = f[name.replace(".", "/")]
            assert data.attrs["index"] == index
            assert torch.equal(torch.as_tensor(np.asarray(data[()])), tensor)
        assert json.loads(f.attrs["classes"]) == cnntrain.load(run).classes
