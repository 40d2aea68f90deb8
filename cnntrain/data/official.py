"""`cnntrain data download|verify`: the official files of the named data sets."""

from __future__ import annotations

from pathlib import Path

from cnntrain.data.cifar import cifar_resources
from cnntrain.data.download import Resource, ensure_resources, verify_file
from cnntrain.data.mnist import mnist_resources
from cnntrain.errors import ConfigError, DataError, did_you_mean


def official_resources(dataset: str) -> list[Resource]:
    """The files ``dataset`` is built from (CIFAR: the python-version tarball)."""
    table = {
        "mnist": lambda: list(mnist_resources("mnist").values()),
        "fashion-mnist": lambda: list(mnist_resources("fashion").values()),
        "cifar10": lambda: cifar_resources(10)[:1],
        "cifar100": lambda: cifar_resources(100)[:1],
    }
    if dataset not in table:
        raise ConfigError(f"no official files for data set {dataset!r}{did_you_mean(dataset, table)}; "
                          f"choose from {', '.join(table)}")
    return table[dataset]()


def download_dataset(dataset: str, data_dir: str | Path) -> list[Path]:
    """Download (resuming partial files) and verify every official file of ``dataset``."""
    return ensure_resources(official_resources(dataset), Path(data_dir), download=True, verify=True)


def verify_dataset(dataset: str, data_dir: str | Path) -> list[tuple[Path, str]]:
    """(path, "ok" | "missing" | "corrupt: ...") for each official file of ``dataset``."""
    report = []
    for resource in official_resources(dataset):
        path = Path(data_dir) / resource.filename
        if not path.exists():
            report.append((path, "missing"))
            continue
        try:
            verify_file(path, resource)
            report.append((path, "ok"))
        except DataError as exc:
            report.append((path, f"corrupt: {exc}"))
    return report
