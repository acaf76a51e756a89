"""Prometheus metrics of the HTTP service (names as in DESIGN.md).

LitServe answers HTTP in several processes and decodes in others, so every metric
lives in prometheus_client's multiprocess mode: each process writes its values to
files under ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` adds them all up. The
client picks its value store when it is first imported, so the server sets that
directory before anything imports this module.

Recorded in the HTTP processes: requests, request duration, requests in flight.
Recorded in the inference workers: queue wait, batch size, tokens, time per token, model info.
"""

import json
import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

MODES = ("greedy", "sample", "beam")

REQUESTS = Counter(
    "genrnn_requests_total", "Requests to /v1/generate by decoding mode and HTTP status code.", ["mode", "status"]
)
REQUEST_DURATION = Histogram(
    "genrnn_request_duration_seconds",
    "Time from a request's arrival to its reply, by decoding mode.",
    ["mode"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
QUEUE_WAIT = Histogram(
    "genrnn_queue_wait_seconds",
    "Time a validated request spent queued before its batch started.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "genrnn_time_per_output_token_seconds",
    "Decoding time of a request's batch divided by the tokens the request received, by decoding mode.",
    ["mode"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
INPUT_TOKENS = Counter("genrnn_input_tokens_total", "Source tokens decoded, by decoding mode.", ["mode"])
OUTPUT_TOKENS = Counter("genrnn_output_tokens_total", "Tokens generated (every candidate), by decoding mode.", ["mode"])
BATCH_SIZE = Histogram(
    "genrnn_batch_size",
    "Inputs decoded together in one engine call.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
INFLIGHT = Gauge(
    "genrnn_inflight_requests",
    "Requests to /v1/generate received and not yet answered.",
    multiprocess_mode="livesum",
)
MODEL_INFO = Gauge(
    "genrnn_model_info",
    "Always 1: the served bundle's name, the genrnn version and each worker's device.",
    ["model", "version", "device"],
    multiprocess_mode="livemax",
)

# The statuses /v1/generate answers with. Every series a request can touch is made at zero as
# each process starts: Prometheus' rate() and increase() miss a counter's first increment, and
# an alert its first 500, when the series appears with it. (499: the client closed the connection
# before its reply, which no one read.)
STATUSES = ("200", "400", "401", "405", "413", "415", "422", "429", "499", "500", "503", "504")


def _zero_series() -> None:
    for mode in (*MODES, "unknown"):
        REQUEST_DURATION.labels(mode)
        for status in STATUSES:
            REQUESTS.labels(mode, status)
    for mode in MODES:
        for metric in (TIME_PER_OUTPUT_TOKEN, INPUT_TOKENS, OUTPUT_TOKENS):
            metric.labels(mode)


_zero_series()


def mode_label(body: bytes) -> str:
    """The decoding mode a request body asks for ("unknown" when the body does not say it in a valid way)."""
    try:
        mode = json.loads(body.decode("utf-8-sig")).get("mode", "greedy")  # UTF-8, a BOM allowed: as the server reads
    except (ValueError, AttributeError, RecursionError):  # RecursionError: nesting past Python's limit
        return "unknown"
    return mode if mode in MODES else "unknown"


class _WrittenFiles:
    """prometheus_client's multiprocess collector over the value files that a process has begun to write.

    A process creates its file empty and sizes it a moment later: the collector, reading
    such a file, failed the whole scrape (a 500 from /metrics) now and then.
    """

    def collect(self) -> Iterator[Metric]:
        directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        files = [str(path) for path in directory.glob("*.db") if _size(path) >= _HEADER_BYTES]
        return iter(MultiProcessCollector.merge(files, accumulate=True))


_HEADER_BYTES = 8  # a value file's first field: how many of its bytes are in use


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # an operator's directory emptied meanwhile
        return 0


def render() -> tuple[bytes, str]:
    """Every process's metrics, added up, in the Prometheus text format; and its content type."""
    registry = CollectorRegistry()
    registry.register(_WrittenFiles())
    return generate_latest(registry), CONTENT_TYPE_LATEST
