"""The server's configuration: one frozen dataclass, checked once, each error naming its option."""

from dataclasses import dataclass, field, fields

import torch

from genrnn.config import AVERAGINGS, DEFAULT_AVERAGING
from genrnn.errors import ConfigurationError
from serving.schemas import Limits

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # the addresses LitServe binds to
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")  # gpu: cuda, as train and generate take it
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _require(condition: bool, option: str, message: str) -> None:
    if not condition:
        raise ConfigurationError(f"{option}: {message}")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


MAX_QUEUE = 1_000_000  # places, 8 bytes each, allocated as the server starts; far more than a deadline lets it answer
MAX_PROCESSES = 256  # inference workers per device, or HTTP processes: each is a process of its own


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``genrnn serve`` needs; the defaults are the command line's."""

    model: str  # bundle directory, or several joined by commas (an ensemble)
    ensemble_averaging: str = DEFAULT_AVERAGING
    host: str = "127.0.0.1"
    port: int = 8000
    accelerator: str = "auto"
    devices: int | str = "auto"  # a count, or "auto": every device of the accelerator
    workers_per_device: int = 1
    api_servers: int | None = None  # HTTP processes; None: one per inference worker
    max_batch_size: int = 64  # inputs decoded together
    batch_timeout: float = 0.005  # seconds a batch waits to fill once its first request is in
    max_queue: int = 256  # requests admitted and unanswered; beyond it, 429
    timeout: float = 30.0  # seconds a request may wait for a worker; beyond it, 504
    deadline: float = 300.0  # seconds a request may take in all; beyond it, 504, and /health calls a worker stuck
    # seconds a worker may stay still before the server stops as a failure (0: never; None: three deadlines)
    exit_when_stuck: float | None = None
    max_body_bytes: int = 1 << 20  # beyond it, 413
    api_key_env: str | None = None  # name of the environment variable that holds the API key
    log_level: str = "info"
    access_log: bool = False
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        _require(self.host in HOSTS, "--host", f"must be one of {', '.join(HOSTS)}; got {self.host!r}")
        _require(1024 <= self.port <= 65535, "--port", f"must be in 1024..65535; got {self.port}")
        _require(
            self.ensemble_averaging in AVERAGINGS,
            "--ensemble-averaging",
            f"must be one of {', '.join(AVERAGINGS)}; got {self.ensemble_averaging!r}",
        )
        _require(self.accelerator in ACCELERATORS, "--accelerator", f"must be one of {', '.join(ACCELERATORS)}")
        if self.accelerator == "gpu":
            object.__setattr__(self, "accelerator", "cuda")
        _require(
            self.devices == "auto" or (isinstance(self.devices, int) and self.devices >= 1),
            "--devices",
            f"must be 'auto' or a positive count; got {self.devices!r}",
        )
        for name in ("workers_per_device", "max_batch_size", "max_queue", "max_body_bytes"):
            _require(getattr(self, name) >= 1, _option(name), "must be at least 1")
        _require(self.api_servers is None or self.api_servers >= 1, "--api-servers", "must be at least 1")
        _require(self.max_queue <= MAX_QUEUE, "--max-queue", f"must be at most {MAX_QUEUE:,}")
        for name in ("workers_per_device", "api_servers"):
            count = getattr(self, name)
            _require(count is None or count <= MAX_PROCESSES, _option(name), f"must be at most {MAX_PROCESSES}")
        _require(self.batch_timeout >= 0, "--batch-timeout", "must be 0 or more")
        _require(self.timeout > self.batch_timeout, "--timeout", "must be longer than --batch-timeout")
        _require(self.deadline > self.timeout, "--deadline", "must be longer than --timeout")
        if self.exit_when_stuck is None:
            object.__setattr__(self, "exit_when_stuck", 3 * self.deadline)
        _require(
            self.exit_when_stuck == 0 or self.exit_when_stuck > self.deadline,
            "--exit-when-stuck",
            "must be 0 (never) or longer than --deadline",
        )
        _require(self.log_level in LOG_LEVELS, "--log-level", f"must be one of {', '.join(LOG_LEVELS)}")
        for limit in fields(self.limits):
            _require(getattr(self.limits, limit.name) >= 1, _option(limit.name), "must be at least 1")


def check_accelerator(accelerator: str) -> None:
    """Refuse an accelerator this machine lacks, before any worker starts and fails on it."""
    present = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }.get(accelerator, True)
    _require(present, "--accelerator", f"{accelerator}: this machine has no such device (try auto or cpu)")
