"""Load test of ``genrnn serve``: dynamic batching against an unbatched server and offline decoding.

    python bench/serve.py --model runs/g2p-en/bundle [--clients 1,8,64,256] [--duration 10] [--rounds 2]

Closed-loop clients (asyncio, one keep-alive connection each, on loopback) each send
one greedy request at a time, one CMUdict test word per request. The same words go
through: the server with ``--max-batch-size`` (default 64); the same server with
``--max-batch-size 1`` (the baseline); and the engine in this process, offline, in
batches of the same size. Both servers run side by side, and at each concurrency
level the three are measured in turn, ``--rounds`` times, ``--duration`` seconds
each in all: on a shared machine whose load drifts, each level's ratios compare
numbers taken seconds apart. A server's turn is measured in its steady state: from
the moment every client has had its first reply (before it, the queue is still
filling) for the turn's seconds, counting the requests answered in that window.
Reported: requests/s, output tokens/s, latency p50/p95/p99 (nearest rank), and the
mean batch size read from ``/metrics`` over the window. The clients share the
machine with the server; on a small machine they take CPU from it too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import torch
from machine import machine  # the script's own directory is on the path
from prometheus_client.parser import text_string_to_metric_families

from genrnn.bundle import load_bundle
from genrnn.config import DecodingConfig
from genrnn.data import read_examples
from genrnn.decoding import Generator


@dataclass
class Result:
    """One row of the table, accumulated over rounds."""

    setup: str
    clients: int | None
    requests: int = 0
    seconds: float = 0.0
    output_tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    batch_inputs: float = 0.0
    batches: float = 0.0
    errors: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def latency(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    def row(self) -> str:
        def ms(value: float | None) -> str:
            return "–" if value is None else f"{value * 1000:.0f}"

        clients = "–" if self.clients is None else str(self.clients)
        batch = f"{self.batch_inputs / self.batches:.1f}" if self.batches else "–"
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


async def load(server: Server, row: Result, words: list[str], seconds: float) -> None:
    """Add to ``row`` ``seconds`` of closed-loop clients, measured from when every one of them has had a reply.

    Until then the queue is still filling: an early request waits behind fewer than a
    steady state puts before it. The window counts the requests answered in it.
    """
    clients = row.clients
    replied: set[int] = set()
    opened = asyncio.Event()
    bounds: list[float] = []  # the window's start and end, once open
    totals: list[tuple[float, float]] = []  # genrnn_batch_size's sum and count at the start and at the end

    async def one_client(index: int) -> None:
        connection = await Connection.open(server.url)
        i = index
        while not bounds or time.perf_counter() < bounds[1]:
            started = time.perf_counter()
            status, reply = await connection.post("/v1/generate", {"inputs": words[i % len(words)]})
            finished = time.perf_counter()
            i += clients
            if bounds and bounds[0] <= finished <= bounds[1]:
                if status == 200:
                    row.requests += 1
                    row.latencies.append(finished - started)
                    row.output_tokens += reply["usage"]["output_tokens"]
                else:
                    row.errors += 1
            replied.add(index)
            if len(replied) == clients:
                opened.set()
        connection.close()

    async def watch() -> None:
        await opened.wait()
        totals.append(await asyncio.to_thread(server.batch_totals))
        bounds.extend([time.perf_counter(), time.perf_counter() + seconds])
        await asyncio.sleep(seconds)
        totals.append(await asyncio.to_thread(server.batch_totals))

    await asyncio.gather(watch(), *(one_client(i) for i in range(clients)))
    (inputs_before, batches_before), (inputs_after, batches_after) = totals
    row.seconds += seconds
    row.batch_inputs += inputs_after - inputs_before
    row.batches += batches_after - batches_before


class Offline:
    """The engine in this process, greedy, in batches of ``batch_size`` words."""

    def __init__(self, model: str, words: list[str], batch_size: int) -> None:
        bundle = load_bundle(model)
        self.generator = Generator(bundle.model, bundle.source_tokenizer, bundle.target_tokenizer)
        self.words = words
        self.batch_size = batch_size
        self.done = 0
        self.generator.generate(words[:batch_size])  # warm up

    def measure(self, row: Result, seconds: float) -> None:
        """Add about ``seconds`` of decoding to ``row``."""
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            chunk = [self.words[(self.done + k) % len(self.words)] for k in range(self.batch_size)]
            self.done += len(chunk)
            generations = self.generator.generate(chunk, DecodingConfig())
            row.requests += len(chunk)
            row.output_tokens += sum(len(c.tokens) for g in generations for c in g.candidates)
            row.batch_inputs += len(chunk)
            row.batches += 1
        row.seconds += time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="bundle directory (the default G2P model)")
    parser.add_argument("--clients", default="1,8,64,256", help="comma-separated concurrency levels")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per setup and level")
    parser.add_argument("--rounds", type=int, default=2, help="turns the duration is split into, per level")
    parser.add_argument("--max-batch-size", type=int, default=64, help="the batched server's batch size")
    parser.add_argument("--batch-timeout", help="the batched server's --batch-timeout (default: the server's)")
    parser.add_argument("--words", type=int, default=2000, help="distinct CMUdict test words to send")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, offline and in each server worker")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    words = [e.source for e in read_examples("builtin:cmudict:test")][: args.words]
    seconds = args.duration / args.rounds

    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; {args.threads} torch thread(s)", flush=True)
    offline = Offline(args.model, words, args.max_batch_size)
    batched_options = ["--max-batch-size", str(args.max_batch_size)]
    batched_setup = f"server, --max-batch-size {args.max_batch_size}"
    if args.batch_timeout:
        batched_options += ["--batch-timeout", args.batch_timeout]
        batched_setup += f" --batch-timeout {args.batch_timeout}"
    # A long timeout: the baseline's queue at 256 clients is measured, not cut short by 504s.
    common = ["--max-queue", "4096", "--timeout", "300", "--deadline", "600"]
    rows: list[Result] = []
    with (
        Server(args.model, args.threads, *common, *batched_options) as batched,
        Server(args.model, args.threads, *common, "--max-batch-size", "1") as unbatched,
    ):
        for clients in levels:
            level = [
                Result(f"offline engine, batches of {args.max_batch_size}", clients),
                Result(batched_setup, clients),
                Result("server, --max-batch-size 1", clients),
            ]
            for _ in range(args.rounds):
                offline.measure(level[0], seconds)
                asyncio.run(load(batched, level[1], words, seconds))
                asyncio.run(load(unbatched, level[2], words, seconds))
            rows += level
            print("\n".join(r.row() for r in level), flush=True)
            print(
                f"{clients} clients: batched/unbatched requests/s {level[1].rps / level[2].rps:.1f}x, "
                f"batched/offline {level[1].rps / level[0].rps:.0%}",
                flush=True,
            )

    print("\n" + HEADER)
    print("\n".join(r.row() for r in rows))


if __name__ == "__main__":
    main()
