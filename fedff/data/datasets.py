"""Datasets: MNIST and Fashion-MNIST from a data directory, and an embedded default.

Where the files are looked for, in order: `--data-dir` (config `data.data_dir`), then
`$FEDFF_DATA_DIR`, then the download cache (`$FEDFF_CACHE_DIR`, default
`~/.cache/fedff`). In each, `<dir>/<dataset>/<file>` and `<dir>/<file>` are accepted.
Every file is md5-checked before use, so a corrupt copy is refused whole.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedff.data.idx import DataError, check_md5, read_idx

FILES = {  # split -> (images, labels)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
MIRRORS = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
}


@dataclass
class Dataset:
    """Flat float features in [0, 1] and integer labels, kept whole in memory."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    image_shape: tuple[int, int]
    num_classes: int = 10

    @property
    def features(self) -> int:
        return self.train_x.shape[1]


def cache_dir() -> Path:
    return Path(os.environ.get("FEDFF_CACHE_DIR", Path.home() / ".cache" / "fedff"))


def search_dirs(data_dir: str | None) -> list[Path]:
    dirs = [Path(d) for d in (data_dir, os.environ.get("FEDFF_DATA_DIR")) if d]
    return [*dirs, cache_dir()]


def find_file(name: str, filename: str, data_dir: str | None) -> Path | None:
    for d in search_dirs(data_dir):
        for candidate in (d / name / filename, d / filename):
            if candidate.is_file():
                return candidate
    return None


def download(name: str, filename: str, mirrors: list[str] | None = None,
             timeout: float = 30.0) -> Path:
    """Fetches one file into the cache, md5-checked before it is moved into place."""
    target = cache_dir() / name / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for base in mirrors or MIRRORS[name]:
        url = base + filename
        fd, name_tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{filename}.")
        os.close(fd)
        partial = Path(name_tmp)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(partial, "wb") as f:
                shutil.copyfileobj(resp, f)
            check_md5(partial, MD5[name][filename])
            os.replace(partial, target)
            return target
        except (urllib.error.URLError, OSError, DataError) as err:
            errors.append(f"{url}: {getattr(err, 'reason', err)}")
        finally:
            partial.unlink(missing_ok=True)
    raise DataError(f"could not download {name}/{filename} (no network, or every mirror "
                    f"failed: {'; '.join(errors)}); copy the files into a folder and pass "
                    f"--data-dir DIR or set FEDFF_DATA_DIR")


def locate(name: str, filename: str, data_dir: str | None, allow_download: bool) -> Path:
    path = find_file(name, filename, data_dir)
    if path is None:
        if allow_download:
            return download(name, filename)
        looked = ", ".join(str(d / name) for d in search_dirs(data_dir))
        raise DataError(f"{name} file {filename} not found (looked in {looked}); pass "
                        f"--data-dir DIR or set FEDFF_DATA_DIR to a folder holding "
                        f"{name}/{filename}, or add --set data.download=true to fetch it")
    check_md5(path, MD5[name][filename])
    return path


def load_idx_dataset(name: str, data_dir: str | None = None,
                     allow_download: bool = False) -> Dataset:
    arrays = {}
    for split, (images, labels) in FILES.items():
        x = read_idx(locate(name, images, data_dir, allow_download))
        y = read_idx(locate(name, labels, data_dir, allow_download))
        arrays[split] = (torch.from_numpy(x.reshape(x.shape[0], -1).astype(np.float32) / 255.0),
                         torch.from_numpy(y.astype(np.int64)))
    return Dataset(name, *arrays["train"], *arrays["test"], image_shape=(28, 28))


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images): no download, for the quick start.

    A fixed 80/20 split (seed 0) keeps results comparable between runs.
    """
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    return Dataset("digits", x[train], y[train], x[test], y[test], image_shape=(8, 8))


def load_dataset(name: str, data_dir: str | None = None, allow_download: bool = False,
                 train_limit: int = 0, test_limit: int = 0) -> Dataset:
    if name == "digits":
        ds = load_digits()
    elif name in MD5:
        ds = load_idx_dataset(name, data_dir, allow_download)
    else:
        raise DataError(f"unknown dataset '{name}'; choose digits, mnist or fashion-mnist")
    if train_limit:
        ds.train_x, ds.train_y = ds.train_x[:train_limit], ds.train_y[:train_limit]
    if test_limit:
        ds.test_x, ds.test_y = ds.test_x[:test_limit], ds.test_y[:test_limit]
    return ds
