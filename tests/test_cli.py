import shutil

import pytest

from cnntrain.cli import build_parser, main
from cnntrain.config import OPTIONS, build_config, config_field_names
from tests.helpers import cli_args, run_cli, tiny


@pytest.mark.parametrize("command", ["train", "eval", "models", "data", "recipes"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: cnntrain" in capsys.readouterr().out


def test_train_help_documents_the_reference_flags(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("-n", "-b", "-e", "-l", "-c", "--lr-schedule", "--warmup-epochs", "--label-smoothing",
                 "--precision", "--resume", "--save-interval", "--no-verify", "--val-split", "--config"):
        assert f"{flag} " in text or f"{flag}," in text or f"{flag}\n" in text, flag


def test_train_help_groups_the_flags_by_section_each_with_help_and_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    titles = ["data:", "model:", "optimisation:", "precision and speed:", "run and outputs:",
              "synchronous data parallel:", "asynchronous parameter server:", "launch ("]
    assert [text.index(t) for t in titles] == sorted(text.index(t) for t in titles)
    assert "--ps-token PS_TOKEN" in text and "--overwrite, --no-overwrite" in text
    optimisation = text.split("optimisation:")[1].split("precision and speed:")[0]
    assert "-l LR, --lr LR" in optimisation and "--max-image-pixels" not in optimisation


def test_every_config_flag_has_help_text_and_a_default():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    actions = {a.dest: a for a in train._actions}
    for name in OPTIONS:
        help_text = actions[name].help
        assert help_text and not help_text.startswith(" ["), name
        assert "[default: " in help_text or name == "ps_token", name


def test_async_ps_workers_on_the_command_line_count_training_processes():
    def config_of(*argv):
        args = build_parser().parse_args(["train", *argv])
        return build_config(args.recipe, **{name: getattr(args, name) for name in config_field_names()})

    cfg = config_of("--strategy", "async-ps", "--ps", "2", "--workers", "3")  # cifar-tf's spelling
    assert (cfg.ps_count, cfg.worker_count, cfg.workers) == (2, 3, -1)
    cfg = config_of("--strategy", "async-ps", "--ps", "2", "--worker-count", "3", "--workers", "4")
    assert (cfg.worker_count, cfg.workers) == (3, 4)
    assert config_of("--workers", "4").workers == 4


def test_models_lists_names_parameters_and_input_size(capsys):
    assert main(["models", "--family", "resnet-cifar"]) in (0, None)
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("resnet20 "))
    assert "269,722" in line and "3x32x32" in line


def test_user_error_is_one_line_without_traceback(tmp_path):
    result = run_cli("train", *cli_args(tiny(tmp_path / "x", model="resnet21")))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "unknown model 'resnet21'" in result.stderr and "did you mean" in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "train", *cli_args(tiny(tmp_path / "x", model="resnet21")))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_train_then_eval_through_the_cli(tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", *cli_args(tiny(run)), "-c", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "top-1" in result.stderr
    assert "val err" in result.stderr  # the per-evaluation table header
    result = run_cli("eval", "--checkpoint", str(run))
    assert result.returncode == 0, result.stderr
    assert "top-1" in result.stdout and "(64 images)" in result.stdout
    # A checkpoint file evaluates too, and gives the same top-1 (EMA off: same weights).
    best = run / "checkpoints" / "best.pt"
    if best.exists():
        again = run_cli("eval", "--checkpoint", str(best))
        assert again.returncode == 0, again.stderr
        assert again.stdout.splitlines()[1].split()[1] == result.stdout.splitlines()[1].split()[1]


def test_python_dash_m_and_console_script_agree():
    result = run_cli("recipes")
    assert result.returncode == 0
    if shutil.which("cnntrain"):
        import subprocess

        out = subprocess.run(["cnntrain", "recipes"], capture_output=True, text=True, timeout=60)
        assert out.stdout == result.stdout


def test_data_download_and_verify_against_a_local_server(tmp_path, http_server, monkeypatch):
    from cnntrain.data import official
    from cnntrain.data.download import Resource, file_digest
    from tests.fixtures import write_cifar_python_tar

    http_server.directory.mkdir(parents=True, exist_ok=True)
    archive = write_cifar_python_tar(http_server.directory, 10, 20, 10)
    fake = Resource("cifar-10-python.tar.gz", http_server.url + "cifar-10-python.tar.gz", md5=file_digest(archive))
    monkeypatch.setattr(official, "official_resources", lambda name: [fake])
    data = tmp_path / "data"
    assert main(["data", "download", "--dataset", "cifar10", "--data-dir", str(data)]) == 0
    assert (data / "cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()
    assert main(["data", "verify", "--dataset", "cifar10", "--data-dir", str(data)]) == 0
    (data / "cifar-10-python.tar.gz").write_bytes(b"broken")
    report = official.verify_dataset("cifar10", data)
    assert report[0][1].startswith("corrupt")


def test_report_compares_runs_in_a_table_and_a_png(tmp_path, capsys):
    import cnntrain

    runs = [cnntrain.train(tiny(tmp_path / name, lr=lr)).run_dir for name, lr in (("a", 0.1), ("b", 0.02))]
    png = tmp_path / "cmp.png"
    assert main(["report", *map(str, runs), "--output", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.count("lenet") == 2 and "best top1" in out
    assert png.stat().st_size > 1000
    assert main(["report", str(tmp_path)]) == 2  # not a run folder: one-line error


def test_gpu_asked_for_but_absent_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", *cli_args(tiny(tmp_path / "g")), "-c", "cudnn"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--device cpu" in err and err.count("\n") == 1
