"""Reading gzip-compressed IDX files (the MNIST family's format), checked end to end."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np

from fedff.errors import FedffError


class DataError(FedffError, RuntimeError):
    """A missing, corrupt or unreadable dataset; the message says what to do."""


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_md5(path: Path, expected: str) -> None:
    actual = md5sum(path)
    if actual != expected:
        raise DataError(f"refusing {path}: md5 {actual} does not match the published "
                        f"{expected} (corrupt or truncated); delete it and copy or "
                        f"download it again")


def read_idx(path: Path) -> np.ndarray:
    """Parses an IDX file: magic (0, 0, dtype 0x08 = uint8, ndim), dims, data."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read {path} as gzip ({err}); delete it and copy or "
                        f"download it again") from err
    if len(raw) < 4 or raw[0:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path} is not a uint8 IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} holds {data.size} values, its header promises "
                        f"{int(np.prod(dims))} {dims}: the file is truncated")
    return data.reshape(dims)
