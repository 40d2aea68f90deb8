"""Every command README shows runs, on tiny data sets, so the documentation cannot rot."""

import itertools
import re
import shlex

import pytest

import cnntrain
from cnntrain.cli import main
from tests.fixtures import write_cifar_python_tar, write_image_folder, write_mnist
from tests.helpers import REPO

README = (REPO / "README.md").read_text()
# Appended to every `cnntrain train` line: a step limit and tiny batches; fixtures are not the
# official files, so their checksums cannot match.
TINY_TRAIN = ["--max-steps", "3", "-b", "8", "--no-verify", "--no-download", "--threads", "1", "--progress", "none",
              "--dist-timeout", "60"]


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def readme_commands():
    lines = [ln.split("  #")[0].strip() for block in _blocks("bash") for ln in block.splitlines()]
    return [ln for ln in lines if ln.startswith("cnntrain ")]


@pytest.fixture
def tiny_world(tmp_path, monkeypatch, http_server):
    """A working folder with tiny MNIST, CIFAR-10/100 and image-folder data where README expects them."""
    from cnntrain.data import official
    from cnntrain.data.download import Resource, file_digest

    monkeypatch.chdir(tmp_path)
    write_mnist(tmp_path / "data", n_train=64, n_test=16)
    cifar10 = write_cifar_python_tar(tmp_path / "data", 10, 40, 10)
    write_cifar_python_tar(tmp_path / "data", 100, 40, 10)
    write_image_folder(tmp_path / "photos", ("ant", "bee"), per_class=260)
    write_image_folder(tmp_path / "photos", ("ant", "bee"), per_class=4, split="val")
    http_server.directory.mkdir(parents=True, exist_ok=True)
    (http_server.directory / cifar10.name).write_bytes(cifar10.read_bytes())
    resource = Resource(cifar10.name, http_server.url + cifar10.name, md5=file_digest(cifar10))
    monkeypatch.setattr(official, "official_resources", lambda name: [resource])
    return tmp_path


def test_readme_has_exactly_two_setup_commands():
    setup = README.split("## Set up a fresh machine")[1].split("\n## ")[0]
    commands = [ln for block in re.findall(r"```bash\n(.*?)```", setup, flags=re.S) for ln in block.splitlines()
                if ln.strip()]
    assert commands == ['pip install -e . && cnntrain train', 'pip install -e ".[dev]" && python -m pytest -q']
    ci = (REPO / ".ci" / "run").read_text()
    assert commands[1] in ci


def test_every_readme_command_runs(tiny_world, capsys):
    commands = readme_commands()
    assert len(commands) >= 10
    for command in commands:
        args = shlex.split(command)[1:]
        if args[0] == "train":
            args += TINY_TRAIN
        code = main(args)
        assert code in (0, None), f"{command!r} failed: {capsys.readouterr().err[-2000:]}"
    assert (tiny_world / "report.png").is_file()


def test_readme_python_example_runs(tiny_world, monkeypatch):
    real_train, runs = cnntrain.train, itertools.count()
    monkeypatch.setattr(cnntrain, "train", lambda **kw: real_train(
        **kw, max_steps=3, verify=False, download=False, threads=1, progress="none", run_dir=f"runs/api{next(runs)}"))
    (code,) = _blocks("python")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["scores"].count == 16
    assert namespace["model"].classes == [str(i) for i in range(10)]
