import os
from pathlib import Path

# One thread: the test networks are too small to gain from more, and a second process
# (a CLI test, a background run) would otherwise fight over the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test starts on one thread: a run with `train.threads` set changes torch's
    process-wide count, and the worker-chain tests compare against this process bitwise."""
    torch.set_num_threads(1)
    yield


@pytest.fixture
def data_dir() -> Path:
    """The real MNIST / Fashion-MNIST folder, from FEDFF_DATA_DIR; skips when absent."""
    root = os.environ.get("FEDFF_DATA_DIR")
    if not root or not (Path(root) / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("real data not present: set FEDFF_DATA_DIR to a folder with mnist/")
    return Path(root)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run tests marked slow (on by default when CI=true)")


# Files that hold the longest tests (minutes of waiting on real deployments, timeouts and
# training), in the order they run first: with a file per core (pytest-xdist, the README's
# test command) a long file started last keeps one core busy alone at the end.
FIRST = ("test_deploy.py", "test_mnist.py", "test_reproduce.py", "test_simulation.py",
         "test_fuzz.py", "test_flower_run.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST
               else len(FIRST))  # stable: the rest keep their order
    if config.getoption("--run-slow") or os.environ.get("CI", "").lower() in ("1", "true"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (CI runs it)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
