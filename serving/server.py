"""The entry point of ``genrnn serve``: wire the API, middlewares and metrics into LitServe, and run it.

Processes: this main process; ``--api-servers`` HTTP processes (forked: they inherit
the request caps and the queue's places set up here); ``--workers-per-device``
inference workers per device (spawned: each loads the bundle in ``setup``); and
LitServe's queue manager.

LitServe drains on SIGINT to this process alone, but SIGTERM (``docker stop``) would
kill this process and leave the others serving. Both signals are therefore routed to
one shutdown: the HTTP processes stop accepting, finish the requests in flight (the
workers still decode them), exit; then the workers and the manager stop.
A signal may also reach every process at once (a terminal's Ctrl+C, systemd, ``kill --
-PGID``). The workers and the queue manager, which the drain still needs, are deaf to
it: this process stops them last. The HTTP processes never see SIGINT: they drain on
the SIGTERM this process sends them, since uvicorn exits at once, dropping the
requests in flight, on a SIGINT that follows another signal, and a loaded machine
can deliver a Ctrl+C to them after this process's SIGTERM.
A signal during startup ends the startup. Should this process die without a word
(SIGKILL), the kernel kills the others with it (on Linux). An inference worker, an
HTTP process or the queue manager that dies stops the server with status 1, so that a
supervisor restarts it.

Only the HTTP processes hold the listening socket (on Linux): this process and the
queue manager close the copies they inherit, so that the port refuses connections as
soon as the HTTP processes stop accepting, rather than queueing them unanswered.
"""

import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import litserve as ls
from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from litserve.callbacks import Callback
from litserve.callbacks.base import EventTypes
from litserve.utils import WorkerSetupStatus

from genrnn import __version__
from genrnn.bundle import load_bundle
from genrnn.errors import ConfigurationError, ServerStopped
from genrnn.processes import die_with
from serving.config import ServeConfig, check_accelerator
from serving.deadline import DeadlineRequestHandler
from serving.liveness import WorkerBeats
from serving.schemas import GenerateRequest
from serving.tickets import Tickets

METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
METRICS_DIR_PREFIX = "genrnn-metrics-"  # then process id, random, pid namespace, host: see _new_metrics_directory
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
MONITOR_THREAD = "litserve-monitoring"  # LitServe's thread that watches the workers
HTTP_MONITOR_THREAD = "genrnn-http-monitoring"  # the thread that watches the HTTP processes
FAILED_DRAIN_SECONDS = 2.0  # how long requests in flight get once a worker has died


class StoppedDuringStartup(Exception):
    """A signal asked the server to stop before it served: it stops as it would have after."""


@contextmanager
def metrics_directory() -> Iterator[Path]:
    """A new, empty directory for this server's multiprocess metrics, set in the environment meanwhile.

    It is made inside the directory that ``PROMETHEUS_MULTIPROC_DIR`` names, where the
    operator set one, or else in the temporary directory; never that directory itself,
    where the files of an earlier run or of another server given the same one would be
    added to this server's values (or deleted under it).
    """
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before its multiprocess directory was set")
    chosen = os.environ.get(METRICS_DIR_VARIABLE)
    parent = Path(chosen or tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_metrics_directories(parent)
    directory = _new_metrics_directory(parent)
    os.environ[METRICS_DIR_VARIABLE] = str(directory)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if chosen:
            os.environ[METRICS_DIR_VARIABLE] = chosen
        else:
            del os.environ[METRICS_DIR_VARIABLE]


def _process_space() -> str:
    """Where this process's id means this process: its host and its pid namespace (a container's own)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc: not Linux
        namespace = 0
    return f"{namespace}-{socket.gethostname()}"


def _new_metrics_directory(parent: Path) -> Path:
    """``genrnn-metrics-PID-RANDOM-NAMESPACE-HOST``, made empty and private to this user."""
    while True:
        directory = parent / f"{METRICS_DIR_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{_process_space()}"
        try:
            directory.mkdir(mode=0o700)
            return directory
        except FileExistsError:
            continue


def remove_stale_metrics_directories(parent: Path) -> None:
    """Delete the metrics directories of servers whose process is gone: a SIGKILL leaves its own behind.

    Only those of processes in this one's host and pid namespace: the ids of others (other
    containers' that share the directory) say nothing here. One named for this very process
    is stale too: a container's server that restarts after a kill often gets its old id.
    """
    for directory in parent.glob(f"{METRICS_DIR_PREFIX}*"):
        owner, _, space = directory.name.removeprefix(METRICS_DIR_PREFIX).partition("-")
        if not owner.isdigit() or space.partition("-")[2] != _process_space():
            continue  # another host's or namespace's, or named before names held them: whose is unknown
        if int(owner) == os.getpid():
            shutil.rmtree(directory, ignore_errors=True)
            continue
        try:
            os.kill(int(owner), 0)
        except ProcessLookupError:
            shutil.rmtree(directory, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def api_key(config: ServeConfig) -> str | None:
    """The API key that ``--api-key-env`` names; ``None`` when it names none.

    Without the white space around it, which no header value can carry (RFC 9110). A
    variable named but unset or blank is refused: serving then without a key would open
    ``/v1/*`` to anyone over a mistyped name or a key that a deployment never passed.
    """
    if config.api_key_env is None:
        return None
    if not config.api_key_env.strip():
        raise ConfigurationError("--api-key-env: name the environment variable that holds the key")
    key = os.environ.get(config.api_key_env, "").strip()
    if not key:
        raise ConfigurationError(
            f"--api-key-env: {config.api_key_env} is not set or is blank; set it to the key, "
            "or leave --api-key-env out to serve without one"
        )
    return key


def check_address_free(host: str, port: int) -> None:
    """Fail now where another process listens on the address: LitServe would find it only after loading the model."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as error:
            raise ConfigurationError(f"--port: cannot listen on {host}:{port}: {error.strerror}") from None


@contextmanager
def signals_blocked(signums: Iterable[int]) -> Iterator[None]:
    """Block ``signums`` in this thread meanwhile; a process started meanwhile keeps them blocked."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def close_server_socket(port: int) -> None:
    """Close this process's copy of the server's socket, the TCP socket bound to ``port`` (on Linux)."""
    if not sys.platform.startswith("linux"):
        return
    for fd in [int(name) for name in os.listdir("/proc/self/fd")]:
        try:
            copy = os.dup(fd)  # looked at through a copy, which closes alone
        except OSError:  # the listing's own descriptor, closed since
            continue
        try:
            with socket.socket(fileno=copy) as sock:
                ours = sock.family in (socket.AF_INET, socket.AF_INET6) and sock.getsockname()[1] == port
                if ours:
                    try:
                        sock.getpeername()
                        ours = False  # a connection, not the server's socket
                    except OSError:
                        pass
        except OSError:  # not a socket
            os.close(copy)
            continue
        if ours:
            os.close(fd)


class ForkedChildrenDieWithServer:
    """Fork hooks: each process that the server's main process forks (queue manager, HTTP) dies with it.

    The hooks pass to the children with the rest of the process; a process that a
    child forks in turn is left alone.
    """

    def __init__(self) -> None:
        self.server = os.getpid()
        self.forking = 0  # the process forking now, as its child sees it
        self.port: int | None = None  # set while forking the queue manager, which serves no HTTP on it

    def register(self) -> None:
        os.register_at_fork(before=self.before_fork, after_in_child=self.after_fork_in_child)

    def before_fork(self) -> None:
        self.forking = os.getpid()

    def after_fork_in_child(self) -> None:
        if self.forking == self.server:
            die_with(self.server)
            if self.port is not None:
                close_server_socket(self.port)


class WorkerSignals(Callback):
    """Each inference worker ignores SIGINT and SIGTERM, and dies with the main process.

    A signal to every process must not cut a drain short: the main process stops the
    workers once the HTTP processes have drained (see :class:`Server`). The workers
    are started with both signals blocked, so that one sent while a worker imports
    is not its end either.
    """

    def __init__(self) -> None:
        self.server = os.getpid()  # made in the main process, which spawns the workers

    def on_before_setup(self, *args: Any, **kwargs: Any) -> None:
        # Runs in each inference worker, before setup. Ignoring a blocked signal discards one
        # already pending. Workers are spawned, not forked: the fork hooks never run in them.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        die_with(self.server)


class Server(ls.LitServer):
    """LitServer that stops on SIGTERM as on SIGINT, drains whoever got the signal, and says why it stopped.

    Its queue manager and inference workers outlive a drain, and a stop asked for
    during startup ends the startup instead of being lost in it.
    """

    def __init__(
        self,
        *args: Any,
        forks: ForkedChildrenDieWithServer,
        deadline: float,
        tickets: Tickets,
        beats: WorkerBeats,
        exit_when_stuck: float,
        closing: Any,
        **kwargs: Any,
    ) -> None:
        self.deadline = deadline  # seconds a request may take in all: read as LitServer's init adds the routes
        self.tickets = tickets  # the queue's places, taken by each request once validated (serving.deadline)
        super().__init__(*args, **kwargs)
        self.forks = forks
        self.beats, self.exit_when_stuck = beats, exit_when_stuck
        self.closing = closing  # shared with the HTTP processes: bodies still arriving are refused (503)
        self.port = 8000  # LitServer.run's default; run() sets it
        self.main_process = os.getpid()
        self.stop_signal: int | None = None  # the signal that asked this server to stop
        self.failure: str | None = None  # why the server stopped, when not asked to
        self.stopping = False  # from here on, an HTTP process that exits was asked to
        self.drain_seconds = self.uvicorn_graceful_timeout  # how long requests in flight get at shutdown

    def run(self, *args: Any, port: int = 8000, **kwargs: Any) -> None:
        self.port = port
        try:
            super().run(*args, port=port, **kwargs)
        except (EOFError, OSError):  # the main thread's wait on the queue manager, which died
            if self.failure is None:
                raise

    def manager_died(self) -> bool:
        """Whether LitServe's queue manager is gone: a call to it fails. (Its process may not be reaped yet.)"""
        try:
            self._shutdown_event.is_set()
        except (EOFError, OSError):  # a broken pipe, a refused connection, a socket file gone
            return True
        return False

    def request_stop(self, signum: int, frame: Any = None) -> None:
        """The handler of SIGTERM and SIGINT: start the shutdown, or have startup give up."""
        # The forked HTTP processes inherit this handler, and uvicorn puts it back and raises
        # SIGTERM again once it has drained: there, it has nothing to do.
        if os.getpid() != self.main_process:
            return
        self.stop_signal = signum
        self.stopping = True
        self.closing.value = 1
        event = self._shutdown_event  # LitServe's main thread waits on it in run()
        if event is None:  # the queue manager is not there yet: _init_manager sets it
            return
        # The shutdown stops the HTTP processes one after the other, so the later ones would keep
        # accepting while the first drains: tell them all now (uvicorn drains on SIGTERM).
        for child in multiprocessing.active_children():
            if child.name.startswith("LitServer-"):
                child.terminate()
        # The main thread is blocked inside a call to the queue manager; setting the event
        # from another thread uses a connection of its own instead of interleaving with it.
        threading.Thread(target=event.set, daemon=True).start()

    def _init_manager(self, num_api_servers: int) -> Any:
        # The queue manager is forked in here and keeps this thread's signal mask: SIGTERM
        # stays blocked in it for good (it ignores SIGINT itself).
        with signals_blocked({signal.SIGTERM}):
            self.forks.port = self.port
            try:
                manager = super()._init_manager(num_api_servers)
            finally:
                self.forks.port = None
        from serving.loop import InputBudgetLoop  # imports the metrics: see build_server

        for lit_api in self.litapi_connector:  # before the workers start: they get the loop with it
            if isinstance(lit_api.loop, InputBudgetLoop):
                lit_api.loop.handed_on = manager.Queue()
        if self.stop_signal is not None:
            self._shutdown_event.set()
        return manager

    def _start_server(self, *args: Any, **kwargs: Any) -> dict[int, Any]:
        # The HTTP processes are forked in here and keep this thread's signal mask: SIGINT stays
        # blocked in them for good, so that only this process's SIGTERM makes them drain.
        with signals_blocked({signal.SIGINT}):
            processes = super()._start_server(*args, **kwargs)
        close_server_socket(self.port)  # the HTTP processes hold theirs
        monitor = threading.Thread(
            target=self._watch, args=(list(processes.values()),), name=HTTP_MONITOR_THREAD, daemon=True
        )
        monitor.start()
        return processes

    def _watch(self, processes: list[multiprocessing.Process]) -> None:
        """Stop the server as a failure when an HTTP process dies or a worker is stuck for good.

        LitServe watches only whether the workers live. The queue places of the requests
        a dead HTTP process held would never come back (429 for good), and with its only
        HTTP process gone the server would go on living and serving nothing. A worker
        still for ``exit_when_stuck`` seconds (a wedged GPU) is not coming back either:
        the server exits with status 1, so that a supervisor starts it again.
        """
        while not self.stopping:
            dead = [p for p in processes if not p.is_alive()]
            stuck = self.beats.still(self.exit_when_stuck) if self.exit_when_stuck else None
            if self.stopping:  # asked to stop meanwhile: an HTTP process that exits now was told to
                return
            if dead:
                self.failure = f"an HTTP process died (exit status {dead[0].exitcode})"
            elif stuck:
                worker, seconds = stuck
                self.failure = (
                    f"inference worker {worker} had not moved for {seconds:.0f} s (--exit-when-stuck "
                    f"{self.exit_when_stuck:g} s): a batch that makes no progress, or a stopped process"
                )
                self.drain_seconds = FAILED_DRAIN_SECONDS  # the requests it holds will never be answered
            if self.failure is not None:
                self._shutdown_event.set()
                return
            time.sleep(self.monitor_internal)

    def _register_api_endpoints(self, lit_api: ls.LitAPI, request_type: Any, response_type: Any) -> None:
        """LitServe's route for the API, with a deadline on each request (:mod:`serving.deadline`)."""
        if lit_api.stream or lit_api.spec:
            super()._register_api_endpoints(lit_api, request_type, response_type)
            return
        self._callback_runner.trigger_event(EventTypes.ON_SERVER_START.value, litserver=self)
        handler = DeadlineRequestHandler(lit_api, self)

        # FastAPI reads the annotations: the body, validated, and the connection (to see the client go).
        async def endpoint_handler(request: request_type, connection: Request) -> response_type:
            return await handler.handle_request(request, request_type, connection)

        auth = Depends(self.setup_auth(lit_api))
        self.app.add_api_route(lit_api.api_path, endpoint_handler, methods=["POST"], dependencies=[auth])

    def launch_inference_worker(self, lit_api: ls.LitAPI) -> list:
        from serving.loop import InputBudgetLoop

        if isinstance(lit_api.loop, InputBudgetLoop):  # before the workers spawn and the HTTP processes fork
            lit_api.loop.beats.allocate(len(self._inference_workers_config_for_api(lit_api.api_path)))
        # Spawning starts multiprocessing's resource tracker once, and that start unblocks both
        # signals in this thread: it must be running before they are blocked.
        resource_tracker.ensure_running()
        with signals_blocked(STOP_SIGNALS):  # until WorkerSignals ignores them
            return super().launch_inference_worker(lit_api)

    def verify_worker_status(self) -> None:
        """LitServe's wait for a first ready worker; it gives up when a worker dies or a signal asks to stop."""
        while not any(status == WorkerSetupStatus.READY for status in self.workers_setup_status.values()):
            failed = any(status == WorkerSetupStatus.ERROR for status in self.workers_setup_status.values())
            failed |= not all(worker.is_alive() for worker in self.inference_workers)
            if failed or self._shutdown_event.is_set():
                self._kill_workers()
                if failed:
                    raise ServerStopped("an inference worker failed to start (see the log above)")
                raise StoppedDuringStartup
            time.sleep(0.05)

    def _kill_workers(self) -> None:
        for worker in self.inference_workers:
            worker.kill()
            worker.join()

    def _perform_graceful_shutdown(
        self, manager: Any, uvicorn_workers: dict[int, Any], shutdown_reason: str = "normal"
    ) -> None:
        """LitServe's shutdown, but the workers ignore SIGTERM: they are killed once nothing is left for them."""
        if threading.current_thread().name == MONITOR_THREAD:
            # A worker died. The main thread waits on the queue manager, and shuts down once woken;
            # shutting down here would take the manager away from under it.
            self.failure = "an inference worker died (see the log above)"
            # A request that the dead worker held would never be answered: the requests in
            # flight get a short while, then their connections close.
            self.drain_seconds = FAILED_DRAIN_SECONDS
            self._shutdown_event.set()
            return
        self.stopping = True
        if self.manager_died():  # killed: the OOM killer, say
            # Whatever else failed then failed with it. The requests in flight can never be
            # answered: their replies would pass through it.
            self.failure = "LitServe's queue manager died"
            self.drain_seconds = FAILED_DRAIN_SECONDS
        # The monitors poll the queue manager and the processes every monitor_internal seconds:
        # had they gone, a poll would die with a traceback, start a second shutdown, or call it a failure.
        for thread in threading.enumerate():
            if thread.name in (MONITOR_THREAD, HTTP_MONITOR_THREAD):
                thread.join(timeout=self.monitor_internal + 1)
        self._transport.close(send_sentinel=shutdown_reason != "keyboard_interrupt")
        self.closing.value = 1
        for http in uvicorn_workers.values():
            http.terminate()  # uvicorn drains on SIGTERM (already told, on a signal: see request_stop)
        drain = self.drain_seconds
        for http in uvicorn_workers.values():
            http.join(timeout=drain)
            if http.is_alive():
                print(f"genrnn serve: {http.name} did not drain in {drain} s", file=sys.stderr)
                http.kill()
        self._kill_workers()  # every reply is out
        manager.shutdown()


def build_server(
    config: ServeConfig, metadata: dict[str, Any], key: str | None, forks: ForkedChildrenDieWithServer
) -> Server:
    """The LitServer with its API, middlewares, ``/metrics`` and error replies."""
    # Imported here, after the metrics directory is set: see serving.metrics.
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from serving import metrics
    from serving.api import GENERATE_PATH, GenerationAPI
    from serving.errors import http_error_reply, validation_error_reply
    from serving.middleware import (
        ApiKeyMiddleware,
        HeadMiddleware,
        HealthMiddleware,
        RepeatedKeyMiddleware,
        RequestMetricsMiddleware,
        Utf8BodyMiddleware,
        WholeBodyMiddleware,
    )

    GenerateRequest.limits = config.limits
    api = GenerationAPI(
        config.model, config.limits, config.max_batch_size, config.batch_timeout, config.ensemble_averaging
    )
    # Shared by the HTTP processes forked from this one and the workers spawned with the API's loop.
    tickets = Tickets(config.max_queue)
    api.loop.tickets = tickets
    closing = multiprocessing.RawValue("b", 0)  # set once the server starts to stop

    # Listed innermost first: each middleware wraps the ones before it. Metrics sees every reply.
    middlewares: list = [
        (HealthMiddleware, {"path": "/health", "beats": api.loop.beats, "deadline": config.deadline}),
        (Utf8BodyMiddleware, {"path": GENERATE_PATH}),
        (RepeatedKeyMiddleware, {"path": GENERATE_PATH}),  # reads the body that the next one has whole
        (WholeBodyMiddleware, {"path": GENERATE_PATH, "closing": closing, "max_body_bytes": config.max_body_bytes}),
    ]
    if key:
        middlewares.append((ApiKeyMiddleware, {"prefix": "/v1/", "key": key}))
    middlewares.append((RequestMetricsMiddleware, {"path": GENERATE_PATH}))
    middlewares.append((HeadMiddleware, {}))  # outermost of ours: they see the GET it stands for

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
        forks=forks,
        deadline=config.deadline,
        tickets=tickets,
        beats=api.loop.beats,
        exit_when_stuck=config.exit_when_stuck,
        closing=closing,
    )

    async def metrics_endpoint() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    server.app.title, server.app.version = "genrnn", __version__  # of /docs and /openapi.json
    server.monitor_internal = 0.5  # seconds between the monitor's polls: also how long shutdown waits for it
    server.app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    server.app.add_exception_handler(RequestValidationError, validation_error_reply)
    server.app.add_exception_handler(StarletteHTTPException, http_error_reply)
    return server


def serve(config: ServeConfig) -> None:
    """Serve the bundle until SIGTERM or SIGINT; requests in flight are answered first.

    Raises :class:`ServerStopped` when the server stopped on its own: a worker died.
    """
    check_accelerator(config.accelerator)
    check_address_free(config.host, config.port)
    key = api_key(config)
    # A bad bundle fails here, with one line, before any process starts.
    bundle = load_bundle(config.model, averaging=config.ensemble_averaging)
    metadata = {**bundle.info(), "limits": {**asdict(config.limits), "max_body_bytes": config.max_body_bytes}}
    del bundle
    if key:
        print(f"genrnn serve: {config.api_key_env} is set: /v1/* requires the key", file=sys.stderr)

    forks = ForkedChildrenDieWithServer()
    forks.register()
    with metrics_directory():
        server = build_server(config, metadata, key, forks)
        for signum in STOP_SIGNALS:
            signal.signal(signum, server.request_stop)
        try:
            server.run(
                host=config.host,
                port=config.port,
                num_api_servers=config.api_servers,
                log_level=config.log_level,
                generate_client_file=False,
                access_log=config.access_log,
            )
        except StoppedDuringStartup:
            print("genrnn serve: stopped during startup, as asked", file=sys.stderr)
    if server.failure:
        raise ServerStopped(f"the server stopped: {server.failure}")
