"""Files a run writes and reads back: atomically, and with errors that say what to do."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from fedff.errors import FedffError


class CheckpointError(FedffError, ValueError):
    """A file that is not a readable fedff checkpoint."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then a rename, so a crash mid-write never leaves half a file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def save(obj: Any, path: Path) -> None:
    """torch.save, atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load(path: Path, what: str = "checkpoint", weights_only: bool = False,
         keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """torch.load of a file fedff wrote; anything else ends in one clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} not found; pass the checkpoint.pt that "
                              f"`fedff train --out DIR` (or simulate, pipeline) wrote")
    try:
        saved = torch.load(path, weights_only=weights_only, map_location="cpu")
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError,
            ValueError, AttributeError, ImportError) as e:
        raise CheckpointError(f"{path} is not a fedff {what} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); pass the "
                              f"checkpoint.pt that fedff wrote") from e
    missing = [k for k in keys if not (isinstance(saved, dict) and k in saved)]
    if missing:
        raise CheckpointError(f"{path} is not a fedff {what}: it has no {missing}; pass "
                              f"the checkpoint.pt that fedff wrote")
    return saved
