"""The entry point of ``genrnn serve``: wire the API, middlewares and metrics into LitServe, and run it.

Processes: this main process; ``--api-servers`` HTTP processes (forked: they inherit
the request caps and the admission counter set up here); ``--workers-per-device``
inference workers per device (spawned: each loads the bundle in ``setup``); and
LitServe's queue manager.

LitServe drains on SIGINT to this process alone, but SIGTERM (``docker stop``) would
kill this process and leave the others serving. Both signals are therefore routed to
one shutdown: the HTTP processes stop accepting, finish the requests in flight (the
workers still decode them), exit; then the workers and the manager stop.
A signal may also reach every process at once (a terminal's Ctrl+C, systemd, ``kill --
-PGID``). The HTTP processes then drain on their own, while the workers and the queue
manager, which the drain still needs, are deaf to it: this process stops them last.
Should this process die without a word (SIGKILL), the kernel kills the others with it.
"""

import ctypes
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import litserve as ls
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from litserve.callbacks import Callback

from genrnn.bundle import load_bundle
from serving.config import ServeConfig, check_accelerator
from serving.schemas import GenerateRequest

METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # prctl's option, from <linux/prctl.h>


def fresh_metrics_directory() -> tuple[Path, bool]:
    """An empty directory for multiprocess metrics, set in the environment; and whether it is ours to delete.

    Values left by an earlier run would be added to this run's, so a directory the
    operator chose is emptied of metric files, and otherwise a new one is made.
    """
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before its multiprocess directory was set")
    chosen = os.environ.get(METRICS_DIR_VARIABLE)
    if chosen:
        directory = Path(chosen)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
        return directory, False
    directory = Path(tempfile.mkdtemp(prefix="genrnn-metrics-"))
    os.environ[METRICS_DIR_VARIABLE] = str(directory)
    return directory, True


def api_key(config: ServeConfig) -> str | None:
    """The API key, when the configured environment variable holds one."""
    if config.api_key_env is None:
        return None
    return os.environ.get(config.api_key_env) or None


def die_with(parent: int) -> None:
    """Have the kernel SIGKILL this process when ``parent`` dies, however it dies (on Linux).

    Else a server whose main process was killed outright (SIGKILL, the OOM killer) would
    leave its HTTP processes holding the port and its workers the model's memory, and
    they ignore SIGTERM (see :class:`WorkerSignals`).
    """
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


class WorkerSignals(Callback):
    """Each inference worker ignores SIGINT and SIGTERM, and dies with the main process.

    A signal to every process must not cut a drain short: the main process stops the
    workers once the HTTP processes have drained (see :class:`Server`).
    """

    def __init__(self) -> None:
        self.server = os.getpid()  # made in the main process, which spawns the workers

    def on_before_setup(self, *args: Any, **kwargs: Any) -> None:
        # Runs in each inference worker, before setup. Workers are spawned, not forked, so
        # the hook that serve() leaves for forked processes never runs in them.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        die_with(self.server)


class Server(ls.LitServer):
    """LitServer whose queue manager and inference workers outlive a drain, whoever got the signal."""

    def _init_manager(self, num_api_servers: int) -> Any:
        # The queue manager is forked in here, and a forked process keeps the signal mask, so
        # SIGTERM stays blocked in it for good (it ignores SIGINT itself). This process gets
        # a SIGTERM that came meanwhile as soon as the mask is back.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            return super()._init_manager(num_api_servers)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def _perform_graceful_shutdown(
        self, manager: Any, uvicorn_workers: dict[int, Any], shutdown_reason: str = "normal"
    ) -> None:
        """LitServe's shutdown, but the workers ignore SIGTERM: they are killed once nothing is left for them."""
        # The monitor polls the queue manager and the workers every monitor_internal seconds:
        # had they gone, its next poll would die with a traceback, or start a second shutdown.
        for thread in threading.enumerate():
            if thread.name == "litserve-monitoring" and thread is not threading.current_thread():
                thread.join(timeout=self.monitor_internal + 1)
        self._transport.close(send_sentinel=shutdown_reason != "keyboard_interrupt")
        for http in uvicorn_workers.values():
            http.terminate()  # uvicorn drains on SIGTERM (already told, on a signal: see drain_on_signals)
        for http in uvicorn_workers.values():
            http.join(timeout=self.uvicorn_graceful_timeout)
            if http.is_alive():
                print(f"genrnn serve: {http.name} did not drain in {self.uvicorn_graceful_timeout} s", file=sys.stderr)
                http.kill()
        for worker in self.inference_workers:  # every reply is out
            worker.kill()
            worker.join()
        manager.shutdown()


def drain_on_signals(server: Server) -> None:
    """Make SIGTERM and SIGINT start LitServe's graceful shutdown."""

    def stop(signum: int, frame: Any) -> None:
        event = server._shutdown_event  # LitServe's main thread waits on it in run()
        if event is None:  # nothing started yet
            raise KeyboardInterrupt
        # The shutdown stops the HTTP processes one after the other, so the later ones would keep
        # accepting while the first drains: tell them all now (uvicorn drains on SIGTERM).
        for child in multiprocessing.active_children():
            if child.name.startswith("LitServer-"):
                child.terminate()
        # The main thread is blocked inside a call to the queue manager; setting the event
        # from another thread uses a connection of its own instead of interleaving with it.
        threading.Thread(target=event.set, daemon=True).start()

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)


def build_server(config: ServeConfig, metadata: dict[str, Any], key: str | None) -> Server:
    """The LitServer with its API, middlewares, ``/metrics`` and error replies."""
    # Imported here, after the metrics directory is set: see serving.metrics.
    from serving import metrics
    from serving.api import GENERATE_PATH, GenerationAPI
    from serving.errors import validation_error_reply
    from serving.middleware import AdmissionMiddleware, ApiKeyMiddleware, RequestMetricsMiddleware

    GenerateRequest.limits = config.limits
    api = GenerationAPI(
        config.model, config.limits, config.max_batch_size, config.batch_timeout, config.ensemble_averaging
    )
    admitted = multiprocessing.Value("i", 0)  # shared by the HTTP processes forked from this one

    # Listed innermost first: each middleware wraps the ones before it. Metrics sees every reply.
    middlewares: list = [
        (AdmissionMiddleware, {"path": GENERATE_PATH, "limit": config.max_queue, "admitted": admitted})
    ]
    if key:
        middlewares.append((ApiKeyMiddleware, {"prefix": "/v1/", "key": key}))
    middlewares.append((RequestMetricsMiddleware, {"path": GENERATE_PATH}))

    server = Server(
        api,
        accelerator=config.accelerator,
        devices=config.devices,
        workers_per_device=config.workers_per_device,
        timeout=config.timeout,
        max_payload_size=config.max_body_bytes,  # bytes: LitServe's check compares it as a number
        middlewares=middlewares,
        model_metadata=metadata,
        callbacks=[WorkerSignals()],
    )

    async def metrics_endpoint() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    server.monitor_internal = 0.5  # seconds between the monitor's polls: also how long shutdown waits for it
    server.app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    server.app.add_exception_handler(RequestValidationError, validation_error_reply)
    return server


def serve(config: ServeConfig) -> None:
    """Serve the bundle until SIGTERM or SIGINT; requests in flight are answered first."""
    check_accelerator(config.accelerator)
    # A bad bundle fails here, with one line, before any process starts.
    bundle = load_bundle(config.model, averaging=config.ensemble_averaging)
    metadata = {**bundle.info(), "limits": {**asdict(config.limits), "max_body_bytes": config.max_body_bytes}}
    del bundle
    key = api_key(config)
    if config.api_key_env:
        state = "set: /v1/* requires the key" if key else "not set: no key required"
        print(f"genrnn serve: {config.api_key_env} is {state}", file=sys.stderr)

    directory, ours = fresh_metrics_directory()
    # The queue manager and the HTTP processes are forked from this one.
    server_pid = os.getpid()
    os.register_at_fork(after_in_child=lambda: die_with(server_pid))
    try:
        server = build_server(config, metadata, key)
        drain_on_signals(server)
        server.run(
            host=config.host,
            port=config.port,
            num_api_servers=config.api_servers,
            log_level=config.log_level,
            generate_client_file=False,
            access_log=config.access_log,
        )
    finally:
        if ours:
            shutil.rmtree(directory, ignore_errors=True)
