"""The HTTP service for real: ``genrnn serve`` on a loopback port, a tiny trained bundle, httpx.

Four servers, started together once: ``keyed`` (2 workers, API key on, small caps)
for replies, validation, batching and metrics; ``small`` (1 worker, no key, a short
queue and timeout) for saturation; and one per shutdown test. Saturation and shutdown
are made deterministic by pausing the inference worker (SIGSTOP) while requests pile up.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from queue import Queue

import httpx
import pytest
import torch
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.transport.process_transport import MPQueueTransport
from litserve.utils import WorkerSetupStatus
from prometheus_client.parser import text_string_to_metric_families

from genrnn.bundle import load_bundle
from genrnn.cli import main
from genrnn.config import DecodingConfig
from genrnn.decoding import Generator, settings_per_source
from genrnn.errors import ConfigurationError
from serving import loop, metrics
from serving.api import Failure, GenerationAPI
from serving.config import ServeConfig
from serving.schemas import GenerateRequest, Limits
from serving.server import ForkedChildrenDieWithServer, api_key, build_server
from serving.tickets import Ticket, Tickets
from tests.conftest import ROOT, children

KEY = "s3cret-key"
KEY_ENV = "GENRNN_TEST_API_KEY"
STARTUP_SECONDS = 180  # two slow shared cores: imports and the bundle take a while in every process


# -- the parts, in this process ------------------------------------------------------------------


def _queued(*sizes: int, age: float = 0.0) -> Queue:
    """A LitServe request queue holding one request per size, with that many inputs each."""
    queue: Queue = Queue()
    for i, size in enumerate(sizes):
        request = GenerateRequest(inputs=[f"w{j}" for j in range(size)])
        queue.put((0, f"uid{i}", time.monotonic() - age, request))
    return queue


def _batches(api: GenerationAPI, queue: Queue, transport: MPQueueTransport) -> list[list[int]]:
    """The input counts of each batch the loop forms until the queue is empty."""
    batches = []
    while True:
        batch, _ = api.loop.get_batch_requests(api, queue, transport)
        if not batch:
            return batches
        batches.append([len(request.inputs) for _, _, request in batch])


def test_a_batch_is_filled_with_inputs_not_requests():
    api = GenerationAPI("unused", Limits(), max_batch_size=4, batch_timeout=0.01)
    api.request_timeout = 30.0
    transport = MPQueueTransport(None, [Queue()])

    assert _batches(api, _queued(3, 2, 1, 6, 1), transport) == [[3], [2, 1], [6], [1]]


def test_a_request_that_does_not_fit_starts_the_next_batch_of_any_worker():
    first, second = (GenerationAPI("unused", Limits(), max_batch_size=4, batch_timeout=0.01) for _ in range(2))
    first.loop.handed_on = second.loop.handed_on = Queue()  # as the server shares it between its workers
    for api in (first, second):
        api.request_timeout = 30.0
    queue, transport = _queued(3, 2, 1), MPQueueTransport(None, [Queue()])

    def sizes(api: GenerationAPI) -> list[int]:
        return [len(request.inputs) for _, _, request in api.loop.get_batch_requests(api, queue, transport)[0]]

    batches = [sizes(first), sizes(second), sizes(first)]

    # the 2 did not fit with the 3: the other worker's next batch starts with it, before the 1 queued after it
    assert batches == [[3], [2, 1], []]


def test_a_worker_idle_on_the_queue_wakes_for_a_request_handed_on(monkeypatch):
    monkeypatch.setattr(loop, "_IDLE_WAIT", 600.0)  # without the wake-up, the worker would sleep through the test
    api = GenerationAPI("unused", Limits(), max_batch_size=4, batch_timeout=0.01)
    api.request_timeout = 30.0
    queue, batches = Queue(), Queue()
    waiting = threading.Thread(
        target=lambda: batches.put(api.loop.get_batch_requests(api, queue, MPQueueTransport(None, [Queue()]))[0])
    )
    waiting.start()
    time.sleep(0.2)  # the worker is blocked on the empty request queue by now
    api.loop.handed_on.put(_queued(2).get())  # what another worker does with a request that did not fit its batch
    queue.put(loop.WAKE)

    ((_, uid, request),) = batches.get(timeout=60)
    waiting.join()
    assert (uid, len(request.inputs)) == ("uid0", 2)


def test_a_request_that_waited_past_the_timeout_is_answered_504_without_decoding():
    api = GenerationAPI("unused", Limits(), max_batch_size=4, batch_timeout=0.01)
    api.request_timeout = 1.0
    replies: Queue = Queue()

    assert _batches(api, _queued(1, age=5.0), MPQueueTransport(None, [replies])) == []
    uid, (error, status, *_) = replies.get_nowait()
    assert (uid, status, error.status_code) == ("uid0", "ERROR", 504)


def test_a_place_in_the_queue_taken_again_tells_the_old_ticket_from_the_new():
    tickets = Tickets(2)
    first, second = tickets.take(), tickets.take()
    assert tickets.take() is None  # every place held: the server answers 429
    tickets.give_back(first)
    again = tickets.take()
    assert again.place == first.place and not tickets.awaited(first) and tickets.awaited(again)
    tickets.give_back(first)  # late, from a request long answered: frees nothing of the new one's
    assert tickets.awaited(again) and tickets.awaited(second)


def test_a_request_no_one_awaits_any_more_is_dropped_undecoded():
    api = GenerationAPI("unused", Limits(), max_batch_size=8, batch_timeout=0.01)
    api.request_timeout = 30.0
    api.loop.tickets = tickets = Tickets(3)
    queue, replies = _queued(1, 2, 3), Queue()
    taken = [tickets.take() for _ in range(3)]
    for ticket in taken:
        (_, _, _, request) = queue.get()
        request.ticket = ticket
        queue.put((0, f"uid{ticket.place}", time.monotonic(), request))
    tickets.give_back(taken[1])  # its client went away, or its deadline passed
    assert tickets.take() == Ticket(place=1, number=4)  # the place is free again, under another number

    assert _batches(api, queue, MPQueueTransport(None, [replies])) == [[1, 3]]
    assert replies.empty()  # no reply for the dropped request: no one would read it


def test_a_late_request_is_answered_at_once_not_when_the_idle_loop_wakes(monkeypatch):
    monkeypatch.setattr(loop, "_IDLE_WAIT", 600.0)  # the loop waits this long for a request that never comes
    api = GenerationAPI("unused", Limits(), max_batch_size=4, batch_timeout=0.01)
    api.request_timeout = 1.0
    queue, replies = _queued(1, age=5.0), Queue()
    looping = threading.Thread(target=_until_stopped, args=(api, queue, MPQueueTransport(None, [replies])))
    looping.start()
    try:
        uid, (error, status, *_) = replies.get(timeout=60)  # the loop is still waiting for more meanwhile
        assert (uid, status, error.status_code) == ("uid0", "ERROR", 504)
    finally:
        queue.put(_SENTINEL_VALUE)
        looping.join()


def _until_stopped(api: GenerationAPI, queue: Queue, transport: MPQueueTransport) -> None:
    """Form batches until the loop is told to stop."""
    try:
        while True:
            api.loop.get_batch_requests(api, queue, transport)
    except _StopLoopError:
        pass


def test_the_queue_wait_lasts_until_the_batch_starts():
    api = GenerationAPI("unused", Limits(), max_batch_size=4, batch_timeout=0.3)
    api.request_timeout = 30.0
    (family,) = metrics.QUEUE_WAIT.collect()
    before = {s.name: s.value for s in family.samples}

    (batch,) = _batches(api, _queued(1), MPQueueTransport(None, [Queue()]))
    (family,) = metrics.QUEUE_WAIT.collect()
    after = {s.name: s.value for s in family.samples}

    # the lone request waited in the worker for company, for --batch-timeout, before its batch started
    assert batch == [1]
    assert after["genrnn_queue_wait_seconds_count"] - before["genrnn_queue_wait_seconds_count"] == 1
    assert after["genrnn_queue_wait_seconds_sum"] - before["genrnn_queue_wait_seconds_sum"] >= 0.3


def batch_size_samples() -> Counter:
    """genrnn_batch_size's count (engine calls) and sum (inputs) so far, in this process."""
    from serving import metrics

    (family,) = metrics.BATCH_SIZE.collect()
    return Counter({s.name: s.value for s in family.samples if s.name.endswith(("_count", "_sum"))})


def test_a_request_that_fails_in_the_engine_fails_alone(tiny_bundle):
    api = GenerationAPI(str(tiny_bundle), Limits(), max_batch_size=8, batch_timeout=0.0)
    api.setup("cpu")
    good = GenerateRequest(inputs=["cat", "dog"])
    # Built without validation: past the engine's length cap, so the engine refuses the whole batch.
    bad = GenerateRequest.model_construct(**{**good.model_dump(), "max_new_tokens": 10_000})

    calls = batch_size_samples()
    outputs = api.predict([good, bad, good])

    # The failed call of six inputs, then one call a request, two inputs each: each call observed.
    assert batch_size_samples() - calls == Counter({"genrnn_batch_size_count": 4, "genrnn_batch_size_sum": 12})
    assert isinstance(outputs[1], Failure) and api.encode_response(outputs[1]).status_code == 500
    assert outputs[0] == outputs[2] == api.predict([good])[0]
    assert [o.input for o in outputs[0].outputs] == ["cat", "dog"]


def test_the_engine_s_steps_show_that_a_worker_is_moving(tiny_bundle):
    api = GenerationAPI(str(tiny_bundle), Limits(), max_batch_size=8, batch_timeout=0.0)
    api.loop.beats.allocate(1)
    api.setup("cpu")
    assert api.loop.beats.stuck(deadline=0.0) is None  # a worker that has not started yet is not stuck

    api.predict([GenerateRequest(inputs=["cat", "dog"], mode="beam", beam_size=2)])  # no loop turns here
    assert api.loop.beats.stuck(deadline=60.0) is None
    time.sleep(0.2)
    assert "inference worker 0 has not moved" in api.loop.beats.stuck(deadline=0.1)


def test_serve_refuses_bad_options_and_bundles_with_one_line(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path), "--port", "80"]) == 1
    assert main(["serve", "--model", str(tmp_path), "--timeout", "60", "--deadline", "60"]) == 1
    assert main(["serve", "--model", str(tmp_path), "--deadline", "60", "--exit-when-stuck", "60"]) == 1
    assert ServeConfig("bundle", deadline=1000).exit_when_stuck == 3000  # a long deadline alone stays valid
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 1
    # sizes that the server would allocate or spawn before it said a word (a queue of 10^11 places hung)
    assert main(["serve", "--model", str(tmp_path), "--max-queue", "100000000000"]) == 1
    assert main(["serve", "--model", str(tmp_path), "--workers-per-device", "100000"]) == 1
    assert main(["serve", "--model", str(tmp_path), "--api-servers", "100000"]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert errors == [
        "genrnn serve: error: --port: must be in 1024..65535; got 80",
        "genrnn serve: error: --deadline: must be longer than --timeout",
        "genrnn serve: error: --exit-when-stuck: must be 0 (never) or longer than --deadline",
        f"genrnn serve: error: bundle directory not found: {tmp_path / 'missing'}",
        "genrnn serve: error: --max-queue: must be at most 1,000,000",
        "genrnn serve: error: --workers-per-device: must be at most 256",
        "genrnn serve: error: --api-servers: must be at most 256",
    ]
    # An address another process listens on is told before the model loads, naming the address.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(tmp_path), "--port", str(port)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"genrnn serve: error: --port: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    with pytest.raises(ConfigurationError, match="--ensemble-averaging: must be one of probabilities, log-prob"):
        ServeConfig(model=str(tmp_path), ensemble_averaging="geometric")
    with pytest.raises(SystemExit) as usage:
        main(["serve", "--model", str(tmp_path), "--ensemble-averaging", "geometric"])
    assert usage.value.code == 2 and "invalid choice: 'geometric'" in capsys.readouterr().err


@pytest.mark.parametrize("accelerator", ["cuda", "mps"])
def test_serve_refuses_an_accelerator_the_machine_lacks(accelerator, tmp_path, capsys):
    present = torch.cuda.is_available() if accelerator == "cuda" else torch.backends.mps.is_available()
    if present:
        pytest.skip(f"this machine has {accelerator}")
    assert main(["serve", "--model", str(tmp_path), "--accelerator", accelerator]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"genrnn serve: error: --accelerator: {accelerator}: this machine has no such device (try auto or cpu)"
    ]


def test_a_server_removes_the_metrics_directories_of_servers_that_are_gone(tmp_path):
    from serving.server import _process_space

    space, host = _process_space(), socket.gethostname()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = gone.stdout.strip()
    stale = tmp_path / f"genrnn-metrics-{dead}-0a1b2c3d-{space}"  # a server killed outright leaves its own
    running = tmp_path / f"genrnn-metrics-{os.getpid()}-0a1b2c3d-{space}"
    unknown = tmp_path / "genrnn-metrics-xyz"  # named before names held the process id
    # Other containers' (say) in the same directory: their process ids mean nothing here.
    other_host = tmp_path / f"genrnn-metrics-{dead}-0a1b2c3d-{space}-b"  # a host whose name begins with ours
    other_namespace = tmp_path / f"genrnn-metrics-{dead}-0a1b2c3d-1-{host}"
    for directory in (stale, running, unknown, other_host, other_namespace):
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"")
    # A server killed outright whose successor got its process id (a container's restart) left one too.
    script = (
        "import os; from serving.server import _process_space, metrics_directory\n"
        "mine = f'{os.environ[\"TMPDIR\"]}/genrnn-metrics-{os.getpid()}-00000000-{_process_space()}'\n"
        "os.mkdir(mine)\n"
        "with metrics_directory() as made:\n"
        "    print(made, made.is_dir(), os.environ['PROMETHEUS_MULTIPROC_DIR'], os.path.exists(mine))\n"
        "print(made.exists(), 'PROMETHEUS_MULTIPROC_DIR' in os.environ)"
    )
    env = {**{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}, "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert not stale.exists() and running.exists() and unknown.exists()
    assert other_host.exists() and other_namespace.exists()
    inside, after = result.stdout.splitlines()
    made, made_is_dir, variable, killed_is_there = inside.split()
    assert Path(made).parent == tmp_path and Path(made).name.startswith("genrnn-metrics-")
    assert made_is_dir == "True" and variable == made and killed_is_there == "False"
    assert after == "False False"  # removed, and the environment as it was


def test_metrics_render_while_a_process_creates_its_value_file(tmp_path):
    # A process's file is created empty and sized a moment later; a scrape in between failed whole.
    script = (
        "from serving import metrics; metrics.REQUESTS.labels('greedy', '200').inc(3); "
        "open(__import__('os').environ['PROMETHEUS_MULTIPROC_DIR'] + '/counter_999999.db', 'w').close(); "
        "print(metrics.render()[0].decode())"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'genrnn_requests_total{mode="greedy",status="200"} 3.0' in result.stdout


# -- a real server in a subprocess ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def inference_workers(pid: int) -> list[int]:
    """The server's inference workers: LitServe spawns them (its HTTP processes are forked)."""
    workers = []
    for child in children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(child)
        except OSError:
            continue
    return workers


def started(process: int) -> int:
    """When ``process`` started, in clock ticks since boot."""
    return int(Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()[19])


def forked(pid: int) -> list[int]:
    """The children that the server's main process forked (not spawned): the queue manager and the HTTP processes."""
    command = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [child for child in children(pid) if Path(f"/proc/{child}/cmdline").read_bytes() == command]


def http_processes(pid: int) -> list[int]:
    """The server's HTTP processes: forked, as the queue manager is, but started after the workers."""
    workers = inference_workers(pid)
    return [child for child in forked(pid) if started(child) >= max(map(started, workers))]


def queue_manager(pid: int) -> int:
    """LitServe's queue manager: the first process the server forks, seconds before the HTTP processes."""
    return min(forked(pid), key=started)


class Server:
    """A ``genrnn serve`` subprocess and an HTTP client for it."""

    def __init__(
        self, bundle: Path, log: Path, *options: str, key: str | None = None, metrics_dir: Path | None = None
    ) -> None:
        """Start the server (without waiting for it: several start at once)."""
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        self.metrics_dir = metrics_dir
        if metrics_dir is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        if key:
            env[KEY_ENV] = key
        command = [sys.executable, "-m", "genrnn.cli", "serve", "--model", str(bundle), "--port", str(port), *options]
        with log.open("w") as out:
            self.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.log = log
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, headers={"X-API-Key": key} if key else {}, timeout=60)

    def ready(self) -> Server:
        """Wait until /health says every worker has loaded the model."""
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            assert self.process.poll() is None, f"server exited during startup:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"server not ready:\n{self.log.read_text()[-3000:]}"
            try:
                if self.client.get("/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.25)

    def terminate(self) -> None:
        """Ask the server to drain and exit (without waiting: several stop at once)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """Wait for the server to exit, then SIGKILL whatever is left of its process group."""
        self.client.close()
        self.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # a failed test may have left some behind
        except ProcessLookupError:
            pass
        self.process.wait()

    def generate(self, **body) -> httpx.Response:
        return self.client.post("/v1/generate", json=body)

    def metrics(self) -> Counter:
        """Every sample of /metrics, keyed by (name, sorted labels)."""
        response = self.client.get("/metrics")
        assert response.status_code == 200
        samples: Counter = Counter()
        for family in text_string_to_metric_families(response.text):
            for s in family.samples:
                samples[s.name, tuple(sorted(s.labels.items()))] += s.value
        return samples

    @contextmanager
    def paused_worker(self) -> Iterator[None]:
        """Requests queue up while the (single) inference worker is stopped."""
        (worker,) = inference_workers(self.process.pid)
        os.kill(worker, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(worker, signal.SIGCONT)

    def wait_for_inflight(self, count: int) -> None:
        seen: list[float] = []

        def reached() -> bool:
            seen.append(self.metrics()["genrnn_inflight_requests", ()])
            return seen[-1] == count

        def last_seen() -> str:
            requests = [line for line in self.log.read_text().splitlines() if "/metrics" not in line]
            return f"; {seen[-1]:g} in flight, server log (but /metrics):\n" + "\n".join(requests[-40:])

        wait_until(reached, f"{count} requests in flight", explain=last_seen)


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 60, explain: Callable[[], str] = str) -> None:
    """Poll ``condition`` until it holds; fail after ``seconds``, naming ``what`` and what ``explain`` adds."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}{explain()}"
        time.sleep(0.05)


def responds(url: str) -> bool:
    """Whether a GET of ``url`` gets any reply."""
    try:
        httpx.get(url, timeout=1)
    except httpx.TransportError:
        return False
    return True


def in_background(function: Callable, **kwargs) -> Queue:
    """Run ``function(**kwargs)`` in a thread; its result arrives on the returned queue."""
    results: Queue = Queue()
    executor = ThreadPoolExecutor(1)
    executor.submit(lambda: results.put(function(**kwargs)))
    executor.shutdown(wait=False)
    return results


# How servers are stopped: SIGTERM to the main process alone (docker stop, Kubernetes) or to every
# process (systemd, kill -- -PGID), and SIGINT to every process (a terminal's Ctrl+C). The last
# stop orders what a loaded machine can: the group's SIGINT reaches the HTTP processes only after
# the main process has told them to stop (uvicorn exits at once on a SIGINT after a signal).
THEN_GROUP = "main process and then the process group"
STOPS = (
    ("SIGTERM", "main process"),
    ("SIGTERM", "process group"),
    ("SIGINT", "process group"),
    ("SIGINT", THEN_GROUP),
)
KEYED_OPTIONS = (
    "--workers-per-device", "2", "--api-key-env", KEY_ENV, "--batch-timeout", "0.05", "--max-batch-size", "16",
    "--max-inputs", "8", "--max-input-length", "32", "--max-beam-size", "4", "--max-return-sequences", "4",
    "--max-new-tokens", "24", "--max-body-bytes", "4096",
)  # fmt: skip
SERVERS = {
    # Two workers (and two HTTP processes), API key required, small caps.
    "keyed": (KEYED_OPTIONS, KEY),
    # One worker, no API key: a queue of 3 requests, a 2-second timeout and a 4-second deadline.
    "small": (("--max-queue", "3", "--timeout", "2", "--deadline", "4"), None),
    # One per shutdown test; two HTTP processes, which must both stop accepting at once.
    **{f"{stop} to the {whom}": (("--api-servers", "2"), None) for stop, whom in STOPS},
    "SIGKILL": (("--api-servers", "2"), None),
    "clients go away": (("--max-queue", "2", "--access-log"), None),  # the log says what came in, should it fail
    "worker dies": ((), None),
    "worker stuck": (("--timeout", "1", "--deadline", "2", "--exit-when-stuck", "3"), None),
    "queue manager dies": ((), None),
    "HTTP process dies": (("--api-servers", "2"), None),
}


@pytest.fixture(scope="module")
def servers(tiny_bundle, other_bundle, tmp_path_factory) -> Iterator[dict[str, Server]]:
    """Every server of this file, started together so that their startups overlap."""
    logs = tmp_path_factory.mktemp("servers")
    shared = tmp_path_factory.mktemp("metrics")  # an operator's metrics directory, given to two servers
    started = {
        name: Server(
            tiny_bundle, logs / f"{name}.log", *options, key=key, metrics_dir=shared if name == "small" else None
        )
        for name, (options, key) in SERVERS.items()
    }
    # Two members whose distributions differ, their log-probabilities averaged.
    ensemble = f"{tiny_bundle},{other_bundle}"
    started["ensemble"] = Server(
        ensemble, logs / "ensemble.log", "--ensemble-averaging", "log-probabilities", metrics_dir=shared
    )
    try:
        yield started
    finally:
        for server in started.values():
            server.terminate()
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def keyed(servers) -> Server:
    return servers["keyed"].ready()


@pytest.fixture(scope="module")
def small(servers) -> Server:
    return servers["small"].ready()


@pytest.fixture(scope="module")
def engine(tiny_bundle) -> Generator:
    """The same bundle, decoded offline: what every HTTP reply must agree with."""
    bundle = load_bundle(tiny_bundle)
    return Generator(bundle.model, bundle.source_tokenizer, bundle.target_tokenizer)


# -- replies -------------------------------------------------------------------------------------


MODES = {
    "greedy": {"mode": "greedy"},
    "sample": {"mode": "sample", "temperature": 0.9, "top_k": 20, "top_p": 0.95, "seed": 7, "num_return_sequences": 3},
    "beam": {"mode": "beam", "beam_size": 4, "num_return_sequences": 2, "length_penalty": 0.6},
}


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_replies_in_the_design_shape_with_the_engine_output(keyed, engine, mode):
    inputs = ["cat", "pronunciation", "dog"]
    response = keyed.generate(inputs=inputs, max_new_tokens=20, **MODES[mode])

    assert response.status_code == 200, response.text
    reply = response.json()
    assert set(reply) == {"model", "outputs", "usage"}
    assert reply["model"] == "tiny"
    assert [o["input"] for o in reply["outputs"]] == inputs
    expected = engine.generate(inputs, settings_per_source(DecodingConfig(max_new_tokens=20, **MODES[mode]), 3))
    for output, generation in zip(reply["outputs"], expected):
        assert output["candidates"] == [
            {
                "text": c.text,
                "tokens": c.tokens,
                "logprob": pytest.approx(c.logprob, abs=1e-4),
                "finish_reason": c.finish_reason,
            }
            for c in generation.candidates
        ]
    assert reply["usage"] == {
        "input_tokens": sum(g.input_tokens for g in expected),
        "output_tokens": sum(len(c.tokens) for g in expected for c in g.candidates),
    }


def test_an_ensemble_is_served_as_the_engine_decodes_it(servers, tiny_bundle, other_bundle):
    ensemble = servers["ensemble"].ready()
    bundle = load_bundle(f"{tiny_bundle},{other_bundle}", averaging="log-probabilities")
    engine = Generator(bundle.model, bundle.source_tokenizer, bundle.target_tokenizer)
    inputs = ["cat", "pronunciation", "dog"]
    for mode in ("greedy", "beam"):
        response = ensemble.generate(inputs=inputs, max_new_tokens=20, **MODES[mode])
        assert response.status_code == 200, response.text
        expected = engine.generate(inputs, DecodingConfig(max_new_tokens=20, **MODES[mode]))
        for output, generation in zip(response.json()["outputs"], expected):
            assert [(c["tokens"], c["finish_reason"]) for c in output["candidates"]] == [
                (c.tokens, c.finish_reason) for c in generation.candidates
            ]
            for got, want in zip(output["candidates"], generation.candidates):
                assert got["logprob"] == pytest.approx(want.logprob, abs=1e-4)
    info = ensemble.client.get("/info").json()["model"]
    assert info["parameters"] == bundle.model.num_parameters()
    assert info["averaging"] == "log-probabilities"
    assert [m["name"] for m in info["ensemble"]] == ["tiny", "other"]


def test_a_seed_gives_the_same_sample_every_time(keyed):
    body = {"inputs": ["banana", "kiwi"], "mode": "sample", "temperature": 1.5, "seed": 123, "num_return_sequences": 4}
    first, second = keyed.generate(**body), keyed.generate(**body)

    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert len(first.json()["outputs"][0]["candidates"]) == 4


def test_the_inputs_of_a_seeded_request_sample_from_streams_of_their_own(keyed):
    # Under one shared stream, copies of a word would all come out alike.
    body = {"inputs": ["pronunciation"] * 8, "mode": "sample", "temperature": 2.0, "seed": 5, "max_new_tokens": 20}
    response = keyed.generate(**body)

    assert response.status_code == 200, response.text
    texts = [output["candidates"][0]["text"] for output in response.json()["outputs"]]
    assert len(set(texts)) > 1, texts


def test_a_single_string_input_gets_a_list_of_one_output(keyed):
    response = keyed.generate(inputs="cat")

    assert response.status_code == 200
    assert [o["input"] for o in response.json()["outputs"]] == ["cat"]


def test_health_before_the_workers_are_ready_is_a_json_503(tiny_bundle):
    # The server as built, and a worker that has not loaded the model yet, as LitServe records it.
    server = build_server(ServeConfig(model=str(tiny_bundle)), {}, None, ForkedChildrenDieWithServer())
    server.workers_setup_status = {0: WorkerSetupStatus.STARTING}

    async def health() -> httpx.Response:
        transport = httpx.ASGITransport(app=server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
            return await client.get("/health")

    response = asyncio.run(health())
    assert response.status_code == 503 and response.headers["content-type"] == "application/json"
    assert response.json() == {"detail": "not ready: an inference worker is still loading the model"}


def test_health_and_info_describe_the_loaded_bundle(keyed):
    assert keyed.client.get("/health").status_code == 200
    info = keyed.client.get("/info").json()["model"]

    assert info["name"] == "tiny"
    assert info["model"]["decoder_hidden"] == 64
    assert info["training"]["steps"] > 0
    assert info["limits"]["max_new_tokens"] == 24


# -- validation ----------------------------------------------------------------------------------


INVALID = [
    ({"inputs": "cat", "mode": "sample", "temperature": 0}, 422, "temperature"),
    ({"inputs": "cat", "temperature": "0.8"}, 422, "temperature"),  # a type is checked in every mode
    ({"inputs": "cat", "mode": "sample", "top_p": 0}, 422, "top_p"),
    ({"inputs": "cat", "mode": "sample", "top_p": 1.5}, 422, "top_p"),
    ({"inputs": "cat", "mode": "sample", "top_k": -1}, 422, "top_k"),
    ({"inputs": "cat", "mode": "sample", "top_k": 10**23}, 422, "top_k"),  # past a tensor's integers
    ({"inputs": "cat", "mode": "sample", "temperature": 1e39}, 422, "temperature"),  # past float32
    ({"inputs": "cat", "mode": "nucleus"}, 422, "mode"),
    ({"inputs": "cat", "mode": "beam", "beam_size": 5}, 422, "beam_size"),
    ({"inputs": "cat", "mode": "sample", "num_return_sequences": 5}, 422, "num_return_sequences"),
    ({"inputs": "cat", "mode": "beam", "beam_size": 2, "num_return_sequences": 3}, 422, "num_return_sequences"),
    ({"inputs": "cat", "max_new_tokens": 25}, 422, "max_new_tokens"),
    ({"inputs": "cat", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"inputs": "cat", "seed": 1.5}, 422, "seed"),
    ({"inputs": "cat", "temprature": 0.5}, 422, "temprature"),
    ({"inputs": "cat", **{f"x{i}": 0 for i in range(11)}}, 422, "body"),  # many unknown keys: one error for all
    ({"inputs": ""}, 422, "inputs"),
    ({"inputs": ["cat", ""]}, 422, "inputs"),
    ({"inputs": ["cat", " \t"]}, 422, "inputs"),  # nothing the tokenizer reads
    ({"inputs": ["cat", "\u200b\ufeff"]}, 422, "inputs"),  # a zero-width space and a BOM: nothing either
    ({"inputs": ["cat", "\u2581\ufffd"]}, 422, "inputs"),  # sentencepiece's space mark, a replacement character
    ({"inputs": []}, 422, "inputs"),
    ({"inputs": 5}, 422, "inputs"),
    ({"mode": "greedy"}, 422, "inputs"),
    ({"inputs": ["cat"] * 9}, 413, "inputs"),
    ({"inputs": "a" * 33}, 413, "inputs"),
]


@pytest.mark.parametrize(("body", "status", "field"), INVALID, ids=[f"{s}-{f}" for _, s, f in INVALID])
def test_a_bad_field_gets_its_status_and_a_message_naming_it(keyed, body, status, field):
    response = keyed.generate(**body)

    assert response.status_code == status
    assert field in response.json()["detail"]
    assert response.json()["errors"][0]["field"].split(".")[0] == field


def test_an_input_is_measured_in_the_characters_the_tokenizer_reads(keyed):
    # U+FDFA is one character, and 18 in the NFKC form that the tokenizer reads: two are 36.
    assert keyed.generate(inputs="\ufdfa").status_code == 200
    response = keyed.generate(inputs=["cat", "\ufdfa" * 2])

    assert response.status_code == 413
    assert "input 1 has 36 characters in Unicode's compatibility forms (NFKC)" in response.json()["detail"]


def test_fields_the_mode_does_not_read_are_ignored_whatever_their_values(keyed):
    # out of range for sampling and beam search, and over this server's caps: greedy reads none of them
    unread = {"temperature": 0, "top_k": -1, "top_p": 7.0, "beam_size": 100, "num_return_sequences": 50}
    plain = keyed.generate(inputs=["cat", "tree"])
    response = keyed.generate(inputs=["cat", "tree"], **unread)

    assert response.status_code == 200
    assert response.json() == plain.json()
    assert keyed.generate(inputs="cat", mode="beam", temperature=0).status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"inputs": "cat", "mode": "sample", "temperature": Infinity}', "temperature"),
        (b'{"inputs": "cat", "mode": "beam", "length_penalty": NaN}', "length_penalty"),
        (b'{"inputs": ["cat", "\\ud800"]}', "inputs"),
        (b'{"inputs": "cat", "mode": "beam", "num_return_sequences": 2, "mode": "greedy"}', "mode"),
        (b'{"inputs": "cat", "x": {"a": 1, "a": 2}}', "x"),  # a repeat inside a field: the field is at fault
    ],
)
def test_json_that_only_python_reads_gets_422(keyed, body, field):
    # Python's parser takes Infinity, NaN and lone surrogates, which the engine cannot,
    # and keeps the last of a repeated key, silently.
    response = keyed.client.post("/v1/generate", content=body, headers={"content-type": "application/json"})

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"].split(".")[0] == field
    assert response.json()["detail"].startswith(f"{field}: ")


def test_a_repeated_key_is_refused_and_counted_as_unknown_whatever_a_second_content_type_says(keyed):
    body = b'{"inputs": "cat", "mode": "beam", "num_return_sequences": 2, "mode": "greedy"}'
    before = keyed.metrics()
    # FastAPI reads the first Content-Type: JSON.
    headers = [("content-type", "application/json"), ("content-type", "text/plain")]
    response = keyed.client.post("/v1/generate", content=body, headers=headers)
    after = keyed.metrics()

    assert response.status_code == 422 and response.json()["detail"] == "mode: is given twice"
    counted = ("genrnn_requests_total", (("mode", "unknown"), ("status", "422")))
    assert after[counted] - before[counted] == 1


def test_a_body_sent_without_its_json_content_type_is_told_so(keyed):
    response = keyed.client.post("/v1/generate", content=b'{"inputs": "cat"}')

    assert response.status_code == 422
    assert "Content-Type: application/json" in response.json()["detail"]


def test_a_body_that_is_not_json_gets_422(keyed):
    response = keyed.client.post(
        "/v1/generate", content=b'{"inputs": "cat",', headers={"content-type": "application/json"}
    )

    assert response.status_code == 422
    assert "JSON" in response.json()["detail"]


NOT_UTF8 = {
    "Latin-1": '{"inputs": "café"}'.encode("latin-1"),
    "UTF-16": '{"inputs": "cat"}'.encode("utf-16"),
    "UTF-16 without a byte-order mark": '{"inputs": "cat"}'.encode("utf-16-le"),
    "a surrogate in UTF-8's form": b'{"inputs": "\xed\xa0\x80"}',
}


@pytest.mark.parametrize("body", NOT_UTF8.values(), ids=NOT_UTF8)
def test_a_body_that_is_not_utf8_gets_400_and_counts_as_unknown(keyed, body):
    before = keyed.metrics()
    response = keyed.client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    after = keyed.metrics()

    assert response.status_code == 400
    assert "UTF-8" in response.json()["detail"]
    counted = ("genrnn_requests_total", (("mode", "unknown"), ("status", "400")))
    assert after[counted] - before[counted] == 1


def test_a_compressed_body_gets_415_and_is_counted(keyed):
    before = keyed.metrics()
    body = b'{"inputs": "cat"}'
    for encoding, sent in (("gzip", gzip.compress(body)), ("br", body)):  # a label is taken at its word
        headers = {"content-type": "application/json", "content-encoding": encoding}
        response = keyed.client.post("/v1/generate", content=sent, headers=headers)
        assert response.status_code == 415
        assert response.json()["detail"] == f"the body is sent with Content-Encoding '{encoding}': send it uncompressed"
    for encoding in ("identity", "Identity, identity"):
        headers = {"content-type": "application/json", "content-encoding": encoding}
        assert keyed.client.post("/v1/generate", content=body, headers=headers).status_code == 200
    assert keyed.client.get("/v1/generate", headers={"content-encoding": "gzip"}).status_code == 405
    after = keyed.metrics()
    for mode, status in (("unknown", "415"), ("greedy", "415")):  # a gzip body's mode cannot be read
        counted = ("genrnn_requests_total", (("mode", mode), ("status", status)))
        assert after[counted] - before[counted] == 1


def test_a_body_nested_past_the_parsers_depth_gets_400_and_is_counted(keyed):
    before = keyed.metrics()
    body = b'{"inputs": ' + b"[" * 1500 + b"]" * 1500 + b"}"
    response = keyed.client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    after = keyed.metrics()

    assert response.status_code == 400 and response.json()["detail"] == "body: JSON nested too deeply to read"
    counted = ("genrnn_requests_total", (("mode", "unknown"), ("status", "400")))
    assert after[counted] - before[counted] == 1
    assert after["genrnn_inflight_requests", ()] == 0
    assert keyed.generate(inputs="cat").status_code == 200


def test_a_body_over_the_size_limit_gets_413_naming_the_limit(keyed):
    response = keyed.client.post("/v1/generate", json={"inputs": "cat", "padding": "x" * 5000})

    assert response.status_code == 413
    assert response.json()["detail"] == "the body is over the server's limit of 4,096 bytes (--max-body-bytes)"


def test_a_number_too_long_to_read_gets_400_saying_so(small):
    body = b'{"inputs": "cat", "mode": "sample", "seed": ' + b"1" * 5000 + b"}"
    response = small.client.post("/v1/generate", content=body, headers={"content-type": "application/json"})

    assert response.status_code == 400
    assert (
        response.json()["detail"] == f"body: a number in the JSON has more than {sys.get_int_max_str_digits():,} digits"
    )


def test_a_body_with_a_byte_order_mark_is_counted_under_its_mode(keyed):
    before = keyed.metrics()
    body = '\ufeff{"inputs": "cat", "mode": "beam"}'.encode()
    response = keyed.client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    after = keyed.metrics()

    assert response.status_code == 200
    counted = ("genrnn_requests_total", (("mode", "beam"), ("status", "200")))
    assert after[counted] - before[counted] == 1


def trickling(url: str) -> socket.socket:
    """A connection that sends a request's headers and 5 bytes of its 100-byte body, then waits."""
    host, port = url.removeprefix("http://").split(":")
    client = socket.create_connection((host, int(port)))
    client.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: genrnn\r\nContent-Type: application/json\r\n")
    client.sendall(b'Content-Length: 100\r\n\r\n{"inp')
    return client


def sent_whole(url: str, body: dict) -> socket.socket:
    """A connection that has sent a whole request, and reads no reply."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    client = socket.create_connection((host, int(port)))
    client.sendall(
        b"POST /v1/generate HTTP/1.1\r\nHost: genrnn\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return client


def test_clients_still_sending_their_bodies_hold_no_place_in_the_queue(small):
    closed, bad = (("genrnn_requests_total", (("mode", "unknown"), ("status", status))) for status in ("499", "400"))
    before = small.metrics()
    clients = [trickling(small.url) for _ in range(3)]  # as many as the queue holds
    try:
        time.sleep(0.5)  # their headers are read by now
        assert small.metrics()["genrnn_inflight_requests", ()] == 0  # in flight once its body is in, as queued
        assert small.generate(inputs="cat").status_code == 200
    finally:
        for client in clients:
            client.close()
    # Gone mid-body: counted apart from the requests that were bad.
    wait_until(lambda: small.metrics()[closed] == before[closed] + 3, "the clients gone to be counted")
    assert small.metrics()[bad] == before[bad]


def test_a_client_that_goes_away_frees_its_place_and_its_request_is_never_decoded(servers):
    server = servers["clients go away"].ready()  # one worker, a queue of 2
    before = server.metrics()
    with server.paused_worker():
        gone = [sent_whole(server.url, {"inputs": ["cat"], "mode": "beam"}) for _ in range(2)]
        server.wait_for_inflight(2)  # the queue is full
        for client in gone:
            client.close()
        server.wait_for_inflight(0)  # ... and empty again: nothing waits for their replies
        waiting = in_background(server.generate, inputs=["dog"])
        server.wait_for_inflight(1)
    reply = waiting.get(timeout=60)
    after = server.metrics()

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before[key]

    assert reply.status_code == 200  # admitted, where the two would have held the queue's places
    assert delta("genrnn_requests_total", mode="beam", status="499") == 2
    assert delta("genrnn_output_tokens_total", mode="beam") == 0  # the worker dropped them undecoded
    assert delta("genrnn_batch_size_count") == 1
    assert delta("genrnn_queue_wait_seconds_count") == 3  # but they waited in the queue as long as it was stuck


def test_bad_requests_are_refused_before_the_queue_and_the_server_still_answers(keyed, engine):
    before = keyed.metrics()
    with ThreadPoolExecutor(8) as pool:
        bad = list(pool.map(lambda case: keyed.generate(**case[0]).status_code, INVALID))
    good = keyed.generate(inputs=["cat"])
    after = keyed.metrics()

    assert bad == [status for _, status, _ in INVALID]
    assert after["genrnn_queue_wait_seconds_count", ()] - before["genrnn_queue_wait_seconds_count", ()] == 1
    assert good.status_code == 200
    assert good.json()["outputs"][0]["candidates"][0]["text"] == engine.generate(["cat"])[0].candidates[0].text


# -- batching and metrics ------------------------------------------------------------------------


async def _many(server: Server, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=server.url, headers=dict(server.client.headers), timeout=120) as client:
        return await asyncio.gather(*(client.post("/v1/generate", json=b) for b in bodies))


def test_64_concurrent_requests_of_mixed_modes_succeed_in_shared_batches(keyed):
    bodies = [{"inputs": [f"word{i}"], **MODES[("greedy", "sample", "beam")[i % 3]]} for i in range(64)]
    before = keyed.metrics()
    responses = asyncio.run(_many(keyed, bodies))
    after = keyed.metrics()

    assert [r.status_code for r in responses] == [200] * 64
    assert [r.json()["outputs"][0]["input"] for r in responses] == [f"word{i}" for i in range(64)]
    batches = after["genrnn_batch_size_count", ()] - before["genrnn_batch_size_count", ()]
    singles = after["genrnn_batch_size_bucket", (("le", "1.0"),)] - before["genrnn_batch_size_bucket", (("le", "1.0"),)]
    assert after["genrnn_batch_size_sum", ()] - before["genrnn_batch_size_sum", ()] == 64
    assert singles < batches  # some batches held several requests


def test_requests_that_do_not_fit_a_batch_are_handed_between_the_two_workers_and_all_answered(keyed):
    sizes = [8, 5, 7, 3, 6, 8] * 4  # no two 8s share a 16-input batch, and most neighbours do not fit together
    bodies = [{"inputs": [f"r{i}w{j}" for j in range(size)]} for i, size in enumerate(sizes)]
    before = keyed.metrics()
    responses = asyncio.run(_many(keyed, bodies))
    after = keyed.metrics()

    assert [r.status_code for r in responses] == [200] * len(sizes)
    assert [[o["input"] for o in r.json()["outputs"]] for r in responses] == [b["inputs"] for b in bodies]
    assert after["genrnn_batch_size_sum", ()] - before["genrnn_batch_size_sum", ()] == sum(sizes)
    assert after["genrnn_batch_size_count", ()] - before["genrnn_batch_size_count", ()] < len(sizes)  # some shared


def test_metrics_from_every_process_add_up_to_the_requests_sent(keyed):
    bodies = [{"inputs": ["cat", "dog"], **MODES["greedy"]}] * 9 + [{"inputs": ["tree"], **MODES["sample"]}] * 6
    bodies += [{"inputs": ["house"], **MODES["beam"]}] * 3 + [{"inputs": "cat", "temperature": "hot"}] * 2
    before = keyed.metrics()
    replies = asyncio.run(_many(keyed, bodies))
    after = keyed.metrics()

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before[key]

    sent = Counter((b.get("mode", "greedy"), r.status_code) for b, r in zip(bodies, replies))
    assert sent == {("greedy", 200): 9, ("sample", 200): 6, ("beam", 200): 3, ("greedy", 422): 2}
    for (mode, status), count in sent.items():
        assert delta("genrnn_requests_total", mode=mode, status=str(status)) == count
    for mode in MODES:
        ok = [r.json()["usage"] for b, r in zip(bodies, replies) if b.get("mode") == mode and r.status_code == 200]
        assert delta("genrnn_output_tokens_total", mode=mode) == sum(u["output_tokens"] for u in ok)
        assert delta("genrnn_input_tokens_total", mode=mode) == sum(u["input_tokens"] for u in ok)
        assert delta("genrnn_time_per_output_token_seconds_count", mode=mode) == len(ok)
        assert delta("genrnn_request_duration_seconds_count", mode=mode) == sent[mode, 200] + sent[mode, 422]
    assert delta("genrnn_queue_wait_seconds_count") == 18
    assert delta("genrnn_batch_size_sum") == 9 * 2 + 6 + 3
    assert after["genrnn_inflight_requests", ()] == 0
    device = "cuda:0" if torch.cuda.is_available() else "cpu"  # the servers run on the default accelerator
    assert after["genrnn_model_info", (("device", device), ("model", "tiny"), ("version", "0.1.0"))] == 1


def test_every_series_a_request_can_touch_is_on_metrics_from_the_start(small):
    # The small server has no API key and decodes no beam request that fails: only a
    # series made in advance is there. (A series that appears with its first increment
    # hides that increment from Prometheus' rate() and increase().)
    samples = small.metrics()
    statuses = ("200", "400", "401", "405", "413", "415", "422", "429", "499", "500", "503", "504")
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert tuple(re.findall(r"\d+", re.search(r"\(the statuses ([^)]*) for each mode\)", readme)[1])) == statuses

    for mode in ("greedy", "sample", "beam", "unknown"):
        for status in statuses:
            assert ("genrnn_requests_total", (("mode", mode), ("status", status))) in samples
        assert ("genrnn_request_duration_seconds_count", (("mode", mode),)) in samples
    for mode in ("greedy", "sample", "beam"):
        for name in ("genrnn_input_tokens_total", "genrnn_output_tokens_total"):
            assert (name, (("mode", mode),)) in samples
        assert ("genrnn_time_per_output_token_seconds_count", (("mode", mode),)) in samples
    assert samples["genrnn_requests_total", (("mode", "beam"), ("status", "500"))] == 0


def test_servers_given_one_metrics_directory_each_count_their_own(servers, small):
    ensemble = servers["ensemble"].ready()
    # Each server works in a directory of its own inside the one given to both.
    assert ensemble.metrics_dir == small.metrics_dir
    assert len(list(small.metrics_dir.glob("genrnn-metrics-*"))) == 2
    before = {server: server.metrics() for server in (small, ensemble)}
    for _ in range(2):
        assert ensemble.generate(inputs=["cat"]).status_code == 200
    after = {server: server.metrics() for server in (small, ensemble)}

    ok = ("genrnn_requests_total", (("mode", "greedy"), ("status", "200")))
    assert after[ensemble][ok] - before[ensemble][ok] == 2
    assert after[small][ok] == before[small][ok]
    models = {server: {dict(labels)["model"] for name, labels in after[server] if name == "genrnn_model_info"}
              for server in (small, ensemble)}  # fmt: skip
    assert models == {small: {"tiny"}, ensemble: {"tiny+other"}}


def test_a_reply_names_the_first_ten_problems_and_counts_the_rest(keyed):
    body = {"inputs": "cat", "mode": "nucleus", "top_k": "5", **{f"x{i}": 0 for i in range(10)}}
    response = keyed.generate(**body)

    assert response.status_code == 422
    assert [e["field"] for e in response.json()["errors"]] == ["mode", "top_k", *(f"x{i}" for i in range(8))]
    assert response.json()["detail"].endswith("; and 2 more")


# -- API key -------------------------------------------------------------------------------------


def test_the_api_key_is_required_on_v1_when_set(keyed):
    url = f"{keyed.url}/v1/generate"
    body = {"inputs": "cat"}

    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"X-API-Key": "wrong"}).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert "API key" in httpx.post(url, json=body).json()["detail"]
    assert httpx.post(url, json=body, headers={"X-API-Key": KEY}).status_code == 200
    assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.post(url, json=body, headers={"X-API-Key": "", "Authorization": f"Bearer {KEY}"}).status_code == 200
    # White space around a header value is not part of it (RFC 9110), whichever header carries the key.
    padded = f"POST /v1/generate HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY} \t\r\nContent-Type: application/json\r\n"
    assert raw_status(keyed.url, padded + 'Content-Length: 17\r\nConnection: close\r\n\r\n{"inputs": "cat"}') == 200
    # Of a header given twice, the first counts, as the app reads headers.
    assert httpx.post(url, json=body, headers=[("X-API-Key", KEY), ("X-API-Key", "wrong")]).status_code == 200
    assert httpx.post(url, json=body, headers=[("X-API-Key", "wrong"), ("X-API-Key", KEY)]).status_code == 401


def test_an_api_key_set_with_white_space_around_it_is_the_key_without(monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_ENV, f" {KEY}\n")
    assert api_key(ServeConfig(model=str(tmp_path), api_key_env=KEY_ENV)) == KEY
    assert api_key(ServeConfig(model=str(tmp_path))) is None  # no variable named: no key
    with pytest.raises(ConfigurationError, match="--api-key-env: name the environment variable that holds the key"):
        api_key(ServeConfig(model=str(tmp_path), api_key_env=" "))


@pytest.mark.parametrize("value", [None, "", " \t"])
def test_a_key_variable_named_but_unset_or_blank_stops_the_server_before_it_opens(value, monkeypatch, tiny_bundle):
    # Serving then without a key would open /v1/* over a mistyped name or a key never passed.
    if value is None:
        monkeypatch.delenv(KEY_ENV, raising=False)
    else:
        monkeypatch.setenv(KEY_ENV, value)
    result = subprocess.run(
        [sys.executable, "-m", "genrnn.cli", "serve", "--model", str(tiny_bundle), "--port", str(free_port()),
         "--api-key-env", KEY_ENV],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"--api-key-env: {KEY_ENV} is not set or is blank; set it to the key" in result.stderr
    assert "Traceback" not in result.stderr


def raw_status(url: str, request: str) -> int:
    """The status of the reply to ``request``, sent as the raw bytes given (no client tidies them)."""
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30) as connection:
        connection.sendall(request.encode())
        return int(connection.recv(64).split()[1])


def test_health_and_metrics_stay_open_with_an_api_key(keyed):
    assert httpx.get(f"{keyed.url}/health").status_code == 200
    assert httpx.get(f"{keyed.url}/metrics").status_code == 200


def test_head_is_answered_as_get_without_the_body(small):
    for path in ("/health", "/info", "/metrics"):
        got, head = httpx.get(small.url + path), httpx.head(small.url + path)
        assert (head.status_code, head.content) == (200, b""), path
        for header in ("content-type", "content-encoding"):  # /health's "ok" has neither; the others are gzipped
            assert head.headers.get(header) == got.headers.get(header), (path, header)
    got, head = httpx.get(small.url + "/info"), httpx.head(small.url + "/info")  # the same reply, compressed
    assert head.headers["content-length"] == got.headers["content-length"]
    assert httpx.head(f"{small.url}/v1/generate").status_code == 405  # POST alone


def test_without_a_key_configured_no_key_is_needed(small):
    assert httpx.post(f"{small.url}/v1/generate", json={"inputs": "cat"}).status_code == 200


# -- saturation ----------------------------------------------------------------------------------


def test_past_the_queue_limit_requests_get_429_with_retry_after(small):
    with small.paused_worker():
        waiting = [in_background(small.generate, inputs=[f"w{i}"]) for i in range(3)]
        small.wait_for_inflight(3)
        refused = small.generate(inputs="cat")

    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert "saturated" in refused.json()["detail"]
    assert all(w.get(timeout=60).status_code in (200, 504) for w in waiting)  # answered, one way or the other
    assert small.generate(inputs="cat").status_code == 200


def test_a_full_queue_still_tells_a_request_that_can_never_succeed_what_is_wrong(small):
    # A 429 would have its client send it again, and again; it takes no place either.
    with small.paused_worker():
        waiting = [in_background(small.generate, inputs=[f"w{i}"]) for i in range(3)]
        small.wait_for_inflight(3)
        wrong_method = small.client.get("/v1/generate")
        not_json = small.client.post("/v1/generate", content=b"not json", headers={"Content-Type": "application/json"})
        unknown_field = small.generate(inputs="cat", bogus=1)
        out_of_range = small.generate(inputs="cat", mode="sample", temperature=-1)
        saturated = small.generate(inputs="cat")

    assert [wrong_method.status_code, not_json.status_code, unknown_field.status_code] == [405, 422, 422]
    assert out_of_range.status_code == 422 and "temperature" in out_of_range.text
    assert saturated.status_code == 429
    assert all(w.get(timeout=60).status_code in (200, 504) for w in waiting)


def test_a_request_that_waits_past_the_timeout_gets_504(small):
    with small.paused_worker():
        waiting = [in_background(small.generate, inputs=[f"w{i}"]) for i in range(2)]
        small.wait_for_inflight(2)
        time.sleep(2.5)  # longer than --timeout 2
    late = [w.get(timeout=60) for w in waiting]

    assert [r.status_code for r in late] == [504, 504]
    assert "timeout" in late[0].json()["detail"]
    assert small.generate(inputs="cat").status_code == 200


def test_a_stuck_worker_fails_health_and_its_requests_get_504_at_the_deadline(small):
    before = small.metrics()["genrnn_requests_total", (("mode", "greedy"), ("status", "504"))]
    with small.paused_worker():
        reply = small.generate(inputs="cat")  # answered by the HTTP process while the worker is stopped
        health = small.client.get("/health")

    assert reply.status_code == 504
    assert "deadline of 4 s" in reply.json()["detail"]
    assert health.status_code == 503
    assert "inference worker 0 has not moved" in health.json()["detail"]
    assert small.metrics()["genrnn_requests_total", (("mode", "greedy"), ("status", "504"))] == before + 1
    # The worker goes on: it answers the forgotten request (a 504 past --timeout, dropped), then this one.
    wait_until(lambda: small.client.get("/health").status_code == 200, "the worker to move again")
    assert small.generate(inputs="cat").status_code == 200


# -- shutdown ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stop", "whom"), STOPS, ids=[f"{stop} to the {whom}" for stop, whom in STOPS])
def test_a_signal_drains_the_request_in_flight_and_every_process_exits(servers, stop, whom):
    server = servers[f"{stop} to the {whom}"].ready()
    processes = children(server.process.pid)
    signum = getattr(signal, stop)
    with server.paused_worker():
        # Several connections, so that both HTTP processes are likely to hold one.
        in_flight = [in_background(server.generate, inputs=["cat", f"dog{i}"], mode="beam") for i in range(4)]
        server.wait_for_inflight(4)
        slow = trickling(server.url)  # a body that will not be complete before the stop
        time.sleep(0.5)  # its headers are read by now
        if whom != "process group":
            server.process.send_signal(signum)
        if whom == THEN_GROUP:  # once every HTTP process has stopped accepting, on the main process's word
            wait_until(lambda: not responds(f"{server.url}/health"), "the HTTP processes to stop accepting")
        if whom != "main process":  # the server leads its own session (see Server)
            os.killpg(server.process.pid, signum)
        time.sleep(1.0)  # every HTTP process stops accepting, even one still draining
        for _ in range(3):  # refused, not left waiting in the socket's queue until the server exits
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{server.url}/health", timeout=5)
    replies = [r.get(timeout=60) for r in in_flight]
    slow.settimeout(60)
    with slow:
        refused = slow.recv(4096).split(b"\r\n", 1)[0]

    assert [r.status_code for r in replies] == [200] * 4
    assert refused == b"HTTP/1.1 503 Service Unavailable"  # told at once, not waited for until the drain gives up
    assert [[o["input"] for o in r.json()["outputs"]] for r in replies] == [["cat", f"dog{i}"] for i in range(4)]
    assert server.process.wait(timeout=60) == 0
    wait_until(lambda: not any(alive(p) for p in processes), "every server process to exit", 30)
    log = server.log.read_text()
    assert "Traceback" not in log and "did not drain" not in log


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_signal_to_every_process_while_the_workers_start_ends_the_startup(tiny_bundle, tmp_path, stop):
    server = Server(tiny_bundle, tmp_path / "server.log", "--api-servers", "2")
    try:
        wait_until(lambda: inference_workers(server.process.pid), "a worker to be spawned")
        processes = children(server.process.pid)
        os.killpg(server.process.pid, getattr(signal, stop))  # while the worker imports, before it is ready
        status = server.process.wait(timeout=60)
    finally:
        server.stop()
    log = server.log.read_text()
    assert status == 0 and "Traceback" not in log, log[-3000:]  # as a server asked to stop after startup
    assert "genrnn serve: stopped during startup, as asked" in log
    assert "Started server process" not in log  # it stopped in the startup: no HTTP process was started
    # The main process's exit does not wait for the last of its children to be reaped.
    wait_until(lambda: not any(alive(p) for p in processes), "every server process to exit", 30)


def reply_or_error(server: Server) -> httpx.Response | httpx.TransportError:
    """The server's reply to a request, or the error of a connection it closed unanswered."""
    try:
        return server.generate(inputs=["cat"])
    except httpx.TransportError as error:
        return error


def test_a_worker_that_dies_stops_the_server_as_a_failure(servers):
    server = servers["worker dies"].ready()
    processes = children(server.process.pid)
    (worker,) = inference_workers(server.process.pid)
    os.kill(worker, signal.SIGSTOP)
    held = in_background(reply_or_error, server=server)  # a request the worker will never answer
    server.wait_for_inflight(1)
    os.kill(worker, signal.SIGKILL)
    assert server.process.wait(timeout=20) == 1  # soon, and a failure: a supervisor restarts it
    log = server.log.read_text()
    assert "genrnn serve: error: the server stopped: an inference worker died" in log and "Traceback" not in log, log
    wait_until(lambda: not any(alive(p) for p in processes), "every server process to exit", 30)
    assert isinstance(held.get(timeout=30), httpx.TransportError)  # its connection closed: the client knows


def test_a_worker_stuck_for_good_stops_the_server_as_a_failure(servers):
    server = servers["worker stuck"].ready()
    processes = children(server.process.pid)
    time.sleep(3.5)
    assert server.generate(inputs=["cat"]).status_code == 200  # an idle worker, turning, is not still
    (worker,) = inference_workers(server.process.pid)
    os.kill(worker, signal.SIGSTOP)  # a wedged GPU, say: alive, and never moving again
    held = in_background(reply_or_error, server=server)
    assert server.process.wait(timeout=30) == 1  # a failure: a supervisor, or Docker's restart policy, starts it again
    log = server.log.read_text()
    assert "genrnn serve: error: the server stopped: inference worker 0 had not moved for" in log, log
    assert "(--exit-when-stuck 3 s)" in log and "Traceback" not in log, log
    wait_until(lambda: not any(alive(p) for p in processes), "every server process to exit", 30)
    reply = held.get(timeout=30)  # its 504 at the deadline, or its connection closed at the exit
    assert isinstance(reply, httpx.TransportError) or reply.status_code == 504


def test_a_queue_manager_that_dies_stops_the_server_as_a_failure(servers):
    server = servers["queue manager dies"].ready()
    processes = children(server.process.pid)
    manager = queue_manager(server.process.pid)
    assert manager not in http_processes(server.process.pid)
    (worker,) = inference_workers(server.process.pid)
    os.kill(worker, signal.SIGSTOP)
    held = in_background(reply_or_error, server=server)  # a request the worker will never answer
    server.wait_for_inflight(1)
    # In flight counts a request from its arrival; it reaches the queue a moment later. Killed before
    # that, the manager would fail the request's submission: a 500, not the held request this is about.
    time.sleep(1.0)
    os.kill(manager, signal.SIGKILL)  # the OOM killer, say: every request and reply passes through it
    assert server.process.wait(timeout=20) == 1  # soon, and a failure: a supervisor restarts it
    log = server.log.read_text()
    assert log.rstrip().endswith("genrnn serve: error: the server stopped: LitServe's queue manager died"), log
    wait_until(lambda: not any(alive(p) for p in processes), "every server process to exit", 30)
    assert isinstance(held.get(timeout=30), httpx.TransportError)  # its connection closed: the client knows


def test_an_http_process_that_dies_stops_the_server_as_a_failure(servers):
    server = servers["HTTP process dies"].ready()
    processes = children(server.process.pid)
    first, _ = http_processes(server.process.pid)
    os.kill(first, signal.SIGKILL)  # the OOM killer, say: the requests it held never give back their slots
    assert server.process.wait(timeout=20) == 1  # soon, and a failure: a supervisor restarts it
    log = server.log.read_text()
    assert "genrnn serve: error: the server stopped: an HTTP process died (exit status -9)" in log, log
    assert "Traceback" not in log, log
    wait_until(lambda: not any(alive(p) for p in processes), "every server process to exit", 30)


def test_every_process_of_the_server_dies_with_its_main_process(servers):
    server = servers["SIGKILL"].ready()
    processes = children(server.process.pid)
    assert len(processes) >= 4  # two HTTP processes, a worker, the queue manager
    # A stopped worker does not notice that the queue manager is gone: only a SIGKILL ends it.
    (worker,) = inference_workers(server.process.pid)
    os.kill(worker, signal.SIGSTOP)
    server.process.kill()  # no handler runs: the OOM killer, kill -9
    server.process.wait(timeout=60)
    # Left alone, they would go on holding the port, the model's memory and requests nobody answers.
    wait_until(lambda: not any(alive(p) for p in processes), "every server process to exit", 30)
