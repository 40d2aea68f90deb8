"""Per-class precision / recall / F1, ECE, the eval report files, temperature calibration, predict --tta."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import cnntrain
from cnntrain.cli import main
from cnntrain.engine.calibration import fit_temperature
from cnntrain.engine.classification_metrics import class_scores, expected_calibration_error, write_eval_report
from cnntrain.engine.evaluate import evaluate
from cnntrain.predict import predict, prepare_image
from tests.fixtures import write_image_folder
from tests.helpers import tiny

CONFUSION = [[5, 1, 0],   # rows: true class, columns: predicted
             [2, 3, 1],
             [0, 0, 4]]


def test_precision_recall_f1_match_a_hand_computation():
    scores = class_scores(CONFUSION)
    # precision = diagonal / column sum, recall = diagonal / row sum, F1 = 2 hits / (row + column)
    want = [(5 / 7, 5 / 6, 10 / 13), (3 / 4, 3 / 6, 6 / 10), (4 / 5, 4 / 4, 8 / 9)]
    for got, (p, r, f) in zip(scores["per_class"], want):
        assert got["precision"] == pytest.approx(p) and got["recall"] == pytest.approx(r)
        assert got["f1"] == pytest.approx(f)
    assert [c["support"] for c in scores["per_class"]] == [6, 6, 4]
    assert scores["macro"]["f1"] == pytest.approx((10 / 13 + 6 / 10 + 8 / 9) / 3)
    assert scores["weighted"]["f1"] == pytest.approx((6 * 10 / 13 + 6 * 6 / 10 + 4 * 8 / 9) / 16)
    assert scores["macro"]["precision"] == pytest.approx((5 / 7 + 3 / 4 + 4 / 5) / 3)
    assert scores["accuracy"] == pytest.approx(12 / 16)
    # A class never predicted has precision 0 (not NaN); a class absent from labels and predictions
    # stays out of the macro average.
    absent = class_scores([[2, 0, 0], [1, 0, 0], [0, 0, 0]])
    assert absent["per_class"][1]["precision"] == 0 and absent["per_class"][1]["f1"] == 0
    assert absent["macro"]["f1"] == pytest.approx((2 * 2 / (2 + 3) + 0) / 2)


def _scored(probabilities: list[float], labels: list[int], temperature: float = 1.0):
    """evaluate() on two-class 'images' that are their own logits: log(p), log(1 - p)."""
    p = torch.tensor(probabilities, dtype=torch.float64)
    logits = torch.stack([p.log(), (1 - p).log()], dim=1).float()
    return evaluate(nn.Identity(), [(logits, torch.tensor(labels))], 2, device=torch.device("cpu"), confusion=True,
                    temperature=temperature)


def test_expected_calibration_error_matches_a_hand_computation():
    # top-1 probabilities 0.9 (right), 0.9 (wrong: label 1), 0.6 (right), 0.55 for class 1 (wrong: label 0)
    result = _scored([0.9, 0.9, 0.6, 0.45], [0, 1, 0, 0])
    # bins of 1/15: 0.9 -> bin 13 (2 images, accuracy 1/2), 0.6 -> bin 9, 0.55 -> bin 8
    want = 2 / 4 * abs(0.5 - 0.9) + 1 / 4 * abs(1 - 0.6) + 1 / 4 * abs(0 - 0.55)
    assert expected_calibration_error(result) == pytest.approx(want, abs=1e-6)
    assert result.bin_count[13] == 2 and result.bin_count[9] == 1 and result.bin_count[8] == 1
    assert result.top1 == 0.5 and result.confusion == [[2, 1], [1, 0]]
    # A temperature changes the confidences (and the loss), never the predictions.
    cooled = _scored([0.9, 0.9, 0.6, 0.45], [0, 1, 0, 0], temperature=2.0)
    assert cooled.top1 == result.top1 and cooled.confusion == result.confusion and cooled.loss != result.loss
    assert sum(cooled.bin_count) == 4 and cooled.bin_count[13] == 0


def test_fitted_temperature_undoes_overconfidence():
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(8000, 5, generator=g) * 1.5
    labels = torch.multinomial(true_logits.softmax(dim=1), 1, generator=g).squeeze(1)
    assert fit_temperature(true_logits * 3, labels) == pytest.approx(3, rel=0.08)
    assert fit_temperature(true_logits, labels) == pytest.approx(1, rel=0.08)


def test_eval_report_writes_csv_png_and_json(tmp_path):
    result = _scored([0.9, 0.9, 0.6, 0.45], [0, 1, 0, 0])
    report = write_eval_report(tmp_path / "eval", result, ["cat", "dog"], "title")
    with open(tmp_path / "eval" / "confusion.csv") as f:
        assert list(csv.reader(f)) == [["true \\ predicted", "cat", "dog"], ["cat", "2", "1"], ["dog", "1", "0"]]
    for name in ("confusion.png", "reliability.png"):
        assert (tmp_path / "eval" / name).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["macro_f1"] == pytest.approx(report["macro_f1"]) and set(saved["per_class"]) == {"cat", "dog"}
    assert saved["per_class"]["cat"]["recall"] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("calibrate")
    write_image_folder(root / "data", classes=("cat", "dog", "owl"), per_class=4, size=(32, 32))
    write_image_folder(root / "data", classes=("cat", "dog", "owl"), per_class=3, size=(32, 32), split="val")
    result = cnntrain.train(tiny(root / "run", dataset="folder", data_dir=str(root / "data"), model="resnet20",
                                 max_steps=3, batch_size=4, lr=0.5))
    return result.run_dir


def _probabilities(run: Path, images: list[Path], temperature: float, flip: bool = False) -> torch.Tensor:
    model, (_, _, meta) = cnntrain.load(run), cnntrain.load_weights(run)
    mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
    batch = (torch.stack([prepare_image(p, (3, 32, 32)) for p in images]).float() / 255 - mean) / std
    with torch.no_grad():
        logits = model(batch)
        if flip:
            logits = (logits + model(batch.flip(3))) / 2
    return (logits / temperature).softmax(dim=1)


def _top(predictions, classes) -> torch.Tensor:
    out = torch.zeros(len(predictions), len(classes))
    for i, p in enumerate(predictions):
        for name, prob in p.top:
            out[i, classes.index(name)] = prob
    return out


def test_end_of_training_report_and_summary(run: Path):
    summary = json.loads((run / "summary.json").read_text())
    assert 0 <= summary["macro_f1"] <= 1 and 0 <= summary["ece"] <= 1
    with open(run / "eval" / "confusion.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == ["cat", "dog", "owl"] and sum(int(v) for r in rows[1:] for v in r[1:]) == 9


def test_calibrate_stores_a_temperature_that_predict_uses(run: Path, capsys):
    assert main(["eval", "--checkpoint", str(run), "--calibrate"]) == 0
    out = capsys.readouterr().out
    assert "temperature" in out and "macro avg" in out and "ECE" in out
    stored = json.loads((run / "calibration.json").read_text())
    temperature = stored["temperature"]
    assert temperature > 0 and temperature != 1.0 and stored["nll_after"] <= stored["nll_before"] + 1e-9
    assert (run / "eval" / "reliability.png").is_file() and (run / "eval" / "confusion.png").is_file()

    images = sorted((run.parent / "data" / "val").rglob("*.jpg"))
    classes = ["cat", "dog", "owl"]
    calibrated = _top(predict(run, images, top_k=3), classes)
    assert torch.allclose(calibrated, _probabilities(run, images, temperature), atol=1e-5)
    raw = _top(predict(run, images, top_k=3, calibrated=False), classes)
    assert torch.allclose(raw, _probabilities(run, images, 1.0), atol=1e-5)
    assert not torch.allclose(raw, calibrated, atol=1e-3)
    tta = _top(predict(run, images, top_k=3, tta=True), classes)
    assert torch.allclose(tta, _probabilities(run, images, temperature, flip=True), atol=1e-5)
    assert main(["predict", str(images[0]), "--checkpoint", str(run), "--tta", "--json"]) == 0

    # Weights that changed since the fit are not calibrated by a stale temperature.
    weights = run / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # flip a bit of the last tensor: other weights, same file name
    weights.write_bytes(bytes(data))
    assert cnntrain.api.temperature_of(run) == 1.0


def _unfolded_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_evaluation_folds_batchnorm_into_convolutions_without_changing_the_scores(name):
    from cnntrain.engine.evaluate import folded_for_inference

    torch.manual_seed(0)
    model = cnntrain.create_model(name, 10).to(memory_format=torch.channels_last)
    model.train()
    with torch.no_grad():  # BN statistics away from their (0, 1) start, so folding has work to do
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32) * 3 + 1)
    images = torch.randn(40, 3, 32, 32).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (40,))
    model.eval()
    folded = folded_for_inference(model)
    assert folded is not model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the trained model is untouched
    with torch.no_grad():
        torch.testing.assert_close(folded(images), _unfolded_logits(model, images), rtol=1e-4, atol=1e-4)
    model.train()
    result = evaluate(model, [(images, labels)], 10)
    assert model.training  # evaluate leaves the mode as it found it
    logits = _unfolded_logits(model, images)
    assert result.top1 == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    assert result.loss == pytest.approx(float(nn.functional.cross_entropy(logits, labels)), rel=1e-4)


def test_a_model_that_cannot_be_traced_is_evaluated_unfolded():
    from cnntrain.engine.evaluate import folded_for_inference

    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

        def forward(self, x):
            x = self.bn(self.conv(x))
            if x.mean() > 0:  # control flow on a tensor's value: symbolic tracing refuses it
                x = -x
            return self.fc(x.mean((2, 3)))

    model = DataDependent().eval()
    assert folded_for_inference(model) is model
    images, labels = torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8,))
    assert evaluate(model, [(images, labels)], 2).count == 8
