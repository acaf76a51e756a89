"""Shared fixtures: small real data and a tiny real bundle, trained once per test session."""

from __future__ import annotations

import os

# The suite runs on every core at once (pytest-xdist), and its servers and jobs start processes
# of their own. OpenMP's threads spin while they wait, so several processes each with a thread
# per core took several times as long as one thread each; tiny models gain nothing from more.
# Set before torch is first imported, here and in every process the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from genrnn.config import load_config, replace
from genrnn.data import read_examples, tsv_line

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = ROOT / "training" / "configs" / "tiny.yaml"


# Tests that share a costly module fixture run on one worker of the parallel run, which builds
# it once: the servers of test_serving.py and test_docker.py, the reversal model, and the
# unbroken runs that the stopped ones are compared with. Keyed by node-id prefix, as the
# scheduler sees node ids only (xdist's own xdist_group mark has no effect under pytest 9).
SHARED_FIXTURE_GROUPS = {
    "tests/test_serving.py::": "servers",
    "tests/test_docker.py::": "docker servers",
    "tests/test_training.py::test_a_tiny_model_learns_to_reverse_strings": "reversal",
    "tests/test_training.py::test_a_student_follows_its_teacher": "reversal",
    "tests/test_training.py::test_a_run_stopped_by_sigterm_saves_as_it_stops": "unbroken runs",
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Tests one at a time to whichever worker is free, but each group above as one."""
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            groups = (group for prefix, group in SHARED_FIXTURE_GROUPS.items() if nodeid.startswith(prefix))
            return next(groups, nodeid)

    return SharedFixtureScheduling(config, log)


def write_tsv(path: Path, examples) -> Path:
    """Write examples as ``source<TAB>target[<TAB>target…]`` lines."""
    path.write_text("".join(tsv_line(e) for e in examples))
    return path


def interruptible(command: list[str], **options) -> subprocess.Popen:
    """Start ``command`` as a terminal would, with Ctrl+C's SIGINT at its default.

    A shell starts background jobs with SIGINT ignored and children inherit that; Python
    then never raises KeyboardInterrupt, so a test run in the background could not interrupt.
    """
    return subprocess.Popen(command, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **options)


def children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def signal_when(
    process: subprocess.Popen, ready: Callable[[], bool], signum: int, what: str, group: bool = False
) -> str | None:
    """Send ``signum`` to ``process`` once ``ready()`` holds (``what``, for a failure); its stderr once it ends.

    With ``group``, to every process of its process group (start it with ``start_new_session=True``).
    """
    deadline = time.monotonic() + 120
    while not ready():
        assert process.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    if group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    return process.communicate(timeout=60)[1]


@pytest.fixture(scope="session")
def g2p_files(tmp_path_factory) -> dict[str, Path]:
    """A small slice of the built-in CMUdict task as TSV files: train, dev and test."""
    directory = tmp_path_factory.mktemp("g2p")
    return {
        "train": write_tsv(directory / "train.tsv", read_examples("builtin:cmudict:train")[::25]),
        "dev": write_tsv(directory / "dev.tsv", read_examples("builtin:cmudict:dev")[::20]),
        "test": write_tsv(directory / "test.tsv", read_examples("builtin:cmudict:test")[::20]),
    }


class Operations(TorchDispatchMode):
    """Records the torch operations dispatched inside ``with Operations() as operations:`` (``names``), and
    counts those that make the host wait for a GPU, on whatever device they run (``host_waits``): reading a
    scalar (``int()``, ``bool()``, ``.item()``), ``nonzero``, and indexing with a boolean mask. Set
    ``watching`` to False to leave a stretch out."""

    WAITS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select")

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.host_waits = 0
        self.watching = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if self.watching:
            indices = args[1] if name.startswith("aten::index") and isinstance(args[1], (list, tuple)) else ()
            masks = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
            self.names.append(name)
            self.host_waits += name in self.WAITS or masks
        return func(*args, **(kwargs or {}))


def train_tiny(train: Path, valid: Path | None, directory: Path, epochs: int = 8, **model: Any) -> Path:
    """A tiny G2P bundle trained for real (a few seconds on a CPU); without ``valid``, dev is held out of ``train``.

    ``model``: settings of the model other than the tiny config's (``attention="luong"``, say).
    """
    from training.train import train as run

    config = load_config(TINY_CONFIG)
    config = replace(
        config,
        model=replace(config.model, **model),
        data=replace(config.data, train=str(train), valid=str(valid) if valid else None),
        training=replace(config.training, max_epochs=epochs, accelerator="cpu"),
    )
    bundle = run(config, directory)
    assert bundle is not None
    return bundle


def noisy_copy(bundle_dir: Path, directory: Path) -> Path:
    """The bundle with noise on its weights, saved in ``directory``: a second member whose distribution differs."""
    import torch

    from genrnn.bundle import load_bundle, save_bundle

    bundle = load_bundle(bundle_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in bundle.model.parameters():
            parameter.add_(0.3 * parameter.std() * torch.randn(parameter.shape, generator=generator))
    tokenizers = (bundle.source_tokenizer, bundle.target_tokenizer)
    return save_bundle(directory, bundle.model, *tokenizers, bundle.tokenizer_config, "other", bundle.training)


@pytest.fixture(scope="session")
def tiny_bundle(g2p_files, tmp_path_factory) -> Path:
    """A tiny G2P bundle trained for real, selected on the dev file."""
    return train_tiny(g2p_files["train"], g2p_files["dev"], tmp_path_factory.mktemp("tiny-run"))


@pytest.fixture(scope="session")
def other_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny bundle with noise on its weights."""
    return noisy_copy(tiny_bundle, tmp_path_factory.mktemp("other") / "bundle")
