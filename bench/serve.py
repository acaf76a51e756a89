"""Load test of ``genrnn serve``: dynamic batching against an unbatched server and offline decoding.

    python bench/serve.py --model runs/g2p-en/bundle [--clients 1,8,64,256] [--duration 10]

Closed-loop clients (asyncio, one keep-alive connection each, on loopback) each send
one greedy request at a time, one CMUdict test word per request, for ``--duration``
seconds per level; httpx reads /health and /metrics. The
same words go through: the server with ``--max-batch-size`` (default 64); the same
server with ``--max-batch-size 1`` (the baseline); and the engine in this process,
offline, in batches of the same size. Reported per level: requests/s, output
tokens/s, latency p50/p95/p99 and the mean batch size read from ``/metrics``.
The client shares the machine with the server, so on a small machine it takes CPU
from the server too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from genrnn.bundle import load_bundle
from genrnn.config import DecodingConfig
from genrnn.data import read_examples
from genrnn.decoding import Generator


@dataclass
class Result:
    """One row of the table."""

    setup: str
    clients: int | None
    requests: int
    seconds: float
    output_tokens: int
    latencies: list[float]
    mean_batch: float | None
    errors: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def latency(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def row(self) -> str:
        def ms(value: float | None) -> str:
            return "–" if value is None else f"{value * 1000:.0f}"

        clients = "–" if self.clients is None else str(self.clients)
        batch = "–" if self.mean_batch is None else f"{self.mean_batch:.1f}"
        return (
            f"| {self.setup} | {clients} | {self.rps:.0f} | {self.output_tokens / self.seconds:.0f} | "
            f"{ms(self.latency(0.5))} | {ms(self.latency(0.95))} | {ms(self.latency(0.99))} | {batch} | {self.errors} |"
        )


HEADER = (
    "| setup | clients | requests/s | output tokens/s | p50 ms | p95 ms | p99 ms | mean batch | errors |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``genrnn serve`` in a subprocess, for the length of a ``with`` block."""

    def __init__(self, model: str, threads: int, *options: str) -> None:
        self.threads = threads
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "genrnn.cli", "serve", "--model", model, "--port", str(self.port)]
        self.command += ["--log-level", "warning", *options]

    def __enter__(self) -> Server:
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        env["OMP_NUM_THREADS"] = str(self.threads)  # torch's threads in each inference worker
        self.process = subprocess.Popen(self.command, env=env, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with status {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server not ready after 300 s")

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)

    def batch_totals(self) -> tuple[float, float]:
        """``genrnn_batch_size`` sum and count."""
        text = httpx.get(f"{self.url}/metrics").text
        values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
        return values.get("genrnn_batch_size_sum", 0.0), values.get("genrnn_batch_size_count", 0.0)


class Connection:
    """One keep-alive HTTP/1.1 connection, written by hand: on a small machine the client's own
    CPU time competes with the server, and this costs a fraction of a general-purpose client's."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str) -> Connection:
        address = httpx.URL(url)
        reader, writer = await asyncio.open_connection(address.host, address.port)
        return cls(reader, writer, f"{address.host}:{address.port}")

    async def post(self, path: str, body: dict) -> tuple[int, dict]:
        """Status code and JSON reply of one POST."""
        payload = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
        self.writer.write(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, json.loads(await self.reader.readexactly(length))

    def close(self) -> None:
        self.writer.close()


async def load(url: str, words: list[str], clients: int, seconds: float) -> tuple[int, int, list[float], int]:
    """Closed-loop clients for ``seconds``: requests done, output tokens, latencies, errors."""
    latencies: list[float] = []
    tokens = errors = 0
    stop = time.perf_counter() + seconds

    async def one_client(index: int) -> None:
        nonlocal tokens, errors
        connection = await Connection.open(url)
        i = index
        while time.perf_counter() < stop:
            started = time.perf_counter()
            status, reply = await connection.post("/v1/generate", {"inputs": words[i % len(words)]})
            if status != 200:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)
            tokens += reply["usage"]["output_tokens"]
            i += clients
        connection.close()

    await asyncio.gather(*(one_client(i) for i in range(clients)))
    return len(latencies), tokens, latencies, errors


def measure_server(server: Server, setup: str, words: list[str], clients: int, seconds: float) -> Result:
    asyncio.run(load(server.url, words, clients, min(2.0, seconds)))  # warm up: connections, first batches
    batch_sum, batch_count = server.batch_totals()
    started = time.perf_counter()
    requests, tokens, latencies, errors = asyncio.run(load(server.url, words, clients, seconds))
    elapsed = time.perf_counter() - started
    batch_sum_after, batch_count_after = server.batch_totals()
    batches = batch_count_after - batch_count
    mean_batch = (batch_sum_after - batch_sum) / batches if batches else None
    return Result(setup, clients, requests, elapsed, tokens, latencies, mean_batch, errors)


def measure_offline(model: str, words: list[str], batch_size: int, seconds: float) -> Result:
    """The engine in this process, greedy, in batches of ``batch_size`` words, for about ``seconds``."""
    bundle = load_bundle(model)
    generator = Generator(bundle.model, bundle.source_tokenizer, bundle.target_tokenizer)
    settings = DecodingConfig()
    generator.generate(words[:batch_size], settings)  # warm up
    requests = tokens = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        chunk = [words[(requests + k) % len(words)] for k in range(batch_size)]
        generations = generator.generate(chunk, settings)
        requests += len(chunk)
        tokens += sum(len(c.tokens) for g in generations for c in g.candidates)
    elapsed = time.perf_counter() - started
    return Result(f"offline engine, batches of {batch_size}", None, requests, elapsed, tokens, [], batch_size)


def machine() -> str:
    """One line about where the numbers come from."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} logical cores, {device}; "
        f"Python {platform.python_version()}, torch {torch.__version__}; load average {load_average:.1f} at start"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="bundle directory (the default G2P model)")
    parser.add_argument("--clients", default="1,8,64,256", help="comma-separated concurrency levels")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per level")
    parser.add_argument("--max-batch-size", type=int, default=64, help="the batched server's batch size")
    parser.add_argument("--words", type=int, default=2000, help="distinct CMUdict test words to send")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, offline and in each server worker")
    parser.add_argument("--batch-timeout", help="the batched server's --batch-timeout (default: the server's)")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    words = [e.source for e in read_examples("builtin:cmudict:test")][: args.words]

    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; {args.threads} torch thread(s)", flush=True)
    results = [measure_offline(args.model, words, args.max_batch_size, args.duration)]
    print(results[-1].row(), flush=True)
    batched_options = ["--max-batch-size", str(args.max_batch_size)]
    batched_setup = f"server, --max-batch-size {args.max_batch_size}"
    if args.batch_timeout:
        batched_options += ["--batch-timeout", args.batch_timeout]
        batched_setup += f" --batch-timeout {args.batch_timeout}"
    unbatched_setup = "server, --max-batch-size 1"
    for setup, options in ((batched_setup, batched_options), (unbatched_setup, ["--max-batch-size", "1"])):
        with Server(args.model, args.threads, "--max-queue", "4096", *options) as server:
            for clients in levels:
                results.append(measure_server(server, setup, words, clients, args.duration))
                print(results[-1].row(), flush=True)

    print("\n" + HEADER)
    for result in results:
        print(result.row())
    offline = results[0]
    for clients in levels:
        batched = next(r for r in results if r.clients == clients and r.setup == batched_setup)
        single = next(r for r in results if r.clients == clients and r.setup == unbatched_setup)
        print(
            f"\n{clients} clients: batched/unbatched requests/s {batched.rps / single.rps:.1f}x; "
            f"batched/offline {batched.rps / offline.rps:.0%}",
            end="",
        )
    print()


if __name__ == "__main__":
    main()
