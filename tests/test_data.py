import gzip
import struct

import pytest

from fedff.data import datasets
from fedff.data.idx import DataError, read_idx


def write_idx(path, dims, payload: bytes | None = None, magic=b"\0\0\x08"):
    body = payload if payload is not None else bytes(int(__import__("math").prod(dims)))
    with gzip.open(path, "wb") as f:
        f.write(magic + bytes([len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + body)


def test_read_idx_parses_dims_and_values(tmp_path):
    path = tmp_path / "x.gz"
    write_idx(path, (2, 3, 2), bytes(range(12)))
    arr = read_idx(path)
    assert arr.shape == (2, 3, 2) and arr[1, 2, 1] == 11


def test_truncated_and_foreign_files_are_refused(tmp_path):
    short = tmp_path / "short.gz"
    write_idx(short, (10, 28, 28), bytes(100))
    with pytest.raises(DataError, match="truncated"):
        read_idx(short)
    bad = tmp_path / "bad.gz"
    write_idx(bad, (3,), bytes(3), magic=b"\1\2\x08")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(bad)
    plain = tmp_path / "plain.gz"
    plain.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read .* as gzip"):
        read_idx(plain)


def test_missing_dataset_says_where_it_looked_and_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDFF_DATA_DIR", raising=False)
    monkeypatch.setenv("FEDFF_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"not found \(looked in .*\); pass --data-dir DIR"):
        datasets.load_dataset("mnist", str(tmp_path / "nowhere"))


def test_corrupt_file_is_refused_whole(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFF_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "mnist"
    folder.mkdir()
    for images, labels in datasets.FILES.values():
        write_idx(folder / images, (1, 28, 28))
        write_idx(folder / labels, (1,))
    with pytest.raises(DataError, match="md5 .* does not match the published"):
        datasets.load_dataset("mnist", str(tmp_path))


def test_download_offline_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFF_CACHE_DIR", str(tmp_path / "cache"))
    dead = ["http://127.0.0.1:9/"]  # the discard port: nothing listens there
    with pytest.raises(DataError, match="could not download mnist/.*--data-dir DIR"):
        datasets.download("mnist", "t10k-labels-idx1-ubyte.gz", dead, timeout=2)
    assert not any((tmp_path / "cache" / "mnist").iterdir())  # nothing half-written


def test_embedded_digits_need_no_files():
    ds = datasets.load_dataset("digits")
    assert ds.train_x.shape[1] == 64 and ds.image_shape == (8, 8)
    assert len(ds.train_y) + len(ds.test_y) == 1797
    assert 0.0 <= float(ds.train_x.min()) and float(ds.train_x.max()) <= 1.0


def test_limits_cut_the_splits():
    ds = datasets.load_dataset("digits", train_limit=100, test_limit=20)
    assert (len(ds.train_y), len(ds.test_y)) == (100, 20)


@pytest.mark.data
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_datasets_load_and_verify(data_dir, name):
    ds = datasets.load_dataset(name, str(data_dir))
    assert ds.train_x.shape == (60000, 784) and ds.test_x.shape == (10000, 784)
    assert sorted(ds.train_y.unique().tolist()) == list(range(10))
    assert float(ds.train_x.max()) == 1.0
