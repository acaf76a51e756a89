"""docker/ and the quickstart, checked without a Docker engine.

What a container would run is run on the host instead: the Dockerfile's own entry command
and settings (docker/entrypoint.sh with its GENRNN_* variables) serving a real bundle, a
real Prometheus (Debian's package) scraping it with the compose stack's scrape job, every
query of the Grafana dashboard evaluated by that Prometheus, and `make run` from training
to a curl that answers.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "genrnn.json"
VENV_BIN = Path(sys.executable).parent
API_KEY = "test-key-for-docker-tests"
PUBLISHED_PORT = "18080"  # the host port compose would publish the service on

# The metric families of DESIGN.md: the dashboard must show every one of them.
DESIGN_METRICS = {
    "genrnn_requests_total",
    "genrnn_request_duration_seconds",
    "genrnn_queue_wait_seconds",
    "genrnn_time_per_output_token_seconds",
    "genrnn_input_tokens_total",
    "genrnn_output_tokens_total",
    "genrnn_batch_size",
    "genrnn_inflight_requests",
    "genrnn_model_info",
}


# -- helpers ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except (httpx.HTTPError, OSError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        keyword, _, arguments = (current + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        current = ""
    return instructions


def runtime_stage() -> list[tuple[str, str]]:
    """The instructions of the Dockerfile's last stage: the image that runs."""
    instructions = dockerfile_instructions(DOCKER / "Dockerfile")
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def image_environment() -> dict[str, str]:
    """The GENRNN_* settings the image's ENV instructions give a container."""
    environment = {}
    for keyword, arguments in runtime_stage():
        if keyword == "ENV":
            environment.update(word.split("=", 1) for word in shlex.split(arguments))
    return {name: value for name, value in environment.items() if name.startswith("GENRNN_")}


def image_command() -> list[str]:
    """ENTRYPOINT + CMD of the image, with the entry script's path in the image mapped to
    the file in this repository that the Dockerfile copies there."""
    stage = runtime_stage()
    entrypoint = next(json.loads(args) for keyword, args in stage if keyword == "ENTRYPOINT")
    command = next(json.loads(args) for keyword, args in stage if keyword == "CMD")
    for keyword, arguments in stage:
        words = [w for w in arguments.split() if not w.startswith("--")]
        if keyword == "COPY" and words[-1] == entrypoint[0]:
            return [str(ROOT / words[0]), *entrypoint[1:], *command]
    raise AssertionError(f"no COPY puts {entrypoint[0]} into the image")


def host_environment(**settings: str) -> dict[str, str]:
    """This process's environment without GENRNN_* and make's variables, the venv first on PATH."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("GENRNN_") and name not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")
    }
    environment["PATH"] = f"{VENV_BIN}{os.pathsep}{environment.get('PATH', '')}"
    environment.update(settings)
    return environment


def stop_process_group(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
    """Signal the process, then make sure its whole process group is gone (SIGKILL as a last resort)."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    finally:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("processes of the server were still running after it stopped")


def sample_names(metrics_text: str) -> set[str]:
    """Every sample name in a Prometheus text exposition (``_bucket``, ``_sum``, ``_count`` included)."""
    return {sample.name for family in text_string_to_metric_families(metrics_text) for sample in family.samples}


def requests_by_mode(metrics_text: str) -> dict[str, float]:
    """genrnn_requests_total summed over status, by mode, as one /metrics page reports it."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "genrnn_requests_total":
                counts[sample.labels["mode"]] = counts.get(sample.labels["mode"], 0) + sample.value
    return counts


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def env_default(value: str) -> str:
    """Compose's ``${NAME:-default}`` with NAME unset: the default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


# -- the image's entry command on the host ---------------------------------------------------------


@dataclass(frozen=True)
class Served:
    url: str
    log: Path
    pid: int  # of the process the entry command started


@pytest.fixture(scope="module")
def entry_command(tiny_bundle, tmp_path_factory) -> Iterator[Served]:
    """The container's entry command run on the host: the Dockerfile's ENTRYPOINT + CMD and its
    GENRNN_* settings, with the bundle, the address, an API key, a cap and a switch set the way
    `docker run -e` would set them."""
    port = free_port()
    log = tmp_path_factory.mktemp("entrypoint") / "server.log"
    environment = host_environment(
        **{
            **image_environment(),
            "GENRNN_MODEL": str(tiny_bundle),
            "GENRNN_HOST": "127.0.0.1",  # the image listens on 0.0.0.0; a test stays on loopback
            "GENRNN_PORT": str(port),
            "GENRNN_API_KEY_ENV": "GENRNN_TEST_API_KEY",
            "GENRNN_TEST_API_KEY": API_KEY,
            "GENRNN_MAX_BEAM_SIZE": "4",
            "GENRNN_ACCESS_LOG": "1",
            "GENRNN_PUBLISHED_PORT": PUBLISHED_PORT,  # as compose sets it: only the announcement reads it
        }
    )
    with log.open("w") as output:
        process = subprocess.Popen(
            image_command(), env=environment, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            assert process.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
            return httpx.get(f"{url}/health", timeout=2).status_code == 200

        wait_for(healthy, 120, "/health of the entry command's server")
        # The entry script announces the service once it is ready: the URL and a curl that works.
        wait_for(lambda: "try:" in log.read_text(), 15, "the entry script's announcement")
        yield Served(url, log, process.pid)
    finally:
        # What `docker stop` does: SIGTERM to that process; then nothing of it may be left.
        stop_process_group(process)


@pytest.fixture(scope="module")
def server(entry_command) -> str:
    """The base URL of the entry command's server."""
    return entry_command.url


def generate(url: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/generate", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)


def test_entry_command_serves_with_the_image_settings(entry_command):
    server = entry_command.url
    assert httpx.get(f"{server}/health", timeout=5).status_code == 200
    # The script execs the server, so the container's main process is `genrnn serve` itself
    # and `docker stop`'s SIGTERM reaches it (a shell in between would not pass it on).
    command_line = Path(f"/proc/{entry_command.pid}/cmdline").read_bytes().split(b"\0")
    assert any(part.endswith(b"genrnn") for part in command_line) and b"serve" in command_line
    # The announcement names the host's port that compose publishes, not the container's.
    assert f"genrnn is ready at http://127.0.0.1:{PUBLISHED_PORT}\n" in entry_command.log.read_text()
    # Each kind of setting reached `genrnn serve`. GENRNN_API_KEY_ENV: the API wants the key.
    assert httpx.post(f"{server}/v1/generate", json={"inputs": "cat"}, timeout=30).status_code == 401
    reply = generate(server, inputs=["cat"], mode="beam", beam_size=2)
    assert reply.status_code == 200, reply.text
    assert reply.json()["outputs"][0]["input"] == "cat"
    # GENRNN_MAX_BEAM_SIZE=4: a value; beyond it, 422 naming the field.
    refused = generate(server, inputs=["cat"], mode="beam", beam_size=5)
    assert refused.status_code == 422 and "beam_size" in refused.text
    # GENRNN_ACCESS_LOG=1: a switch; every request is logged.
    log = entry_command.log
    wait_for(lambda: '"POST /v1/generate HTTP/1.1" 200' in log.read_text(), 10, "the access log line")


def test_healthcheck_command_follows_the_server(server):
    """The Dockerfile's HEALTHCHECK command, run as the container would: 0 while the server is
    up, non-zero when nothing answers on GENRNN_PORT."""
    (arguments,) = [args for keyword, args in runtime_stage() if keyword == "HEALTHCHECK"]
    assert re.search(r"--start-period=\d+", arguments), "model loading needs a start period"
    check = json.loads(arguments.split(" CMD ", 1)[1])
    up = subprocess.run(check, env=host_environment(GENRNN_PORT=server.rsplit(":", 1)[1]), timeout=30)
    assert up.returncode == 0
    down = subprocess.run(check, env=host_environment(GENRNN_PORT=str(free_port())), capture_output=True, timeout=30)
    assert down.returncode != 0


def test_healthcheck_command_takes_an_empty_port_for_the_default():
    """GENRNN_PORT set but empty keeps the server's port, 8000, as the entry script reads it."""
    (arguments,) = [args for keyword, args in runtime_stage() if keyword == "HEALTHCHECK"]
    check = json.loads(arguments.split(" CMD ", 1)[1])

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    try:
        stand_in = http.server.HTTPServer(("127.0.0.1", 8000), Healthy)
    except OSError:
        pytest.skip("port 8000 is taken here")
    threading.Thread(target=stand_in.serve_forever, daemon=True).start()
    try:
        assert subprocess.run(check, env=host_environment(GENRNN_PORT=""), timeout=30).returncode == 0
    finally:
        stand_in.shutdown()
        stand_in.server_close()


def test_entry_script_mirrors_every_serve_option():
    """One GENRNN_* variable per `genrnn serve` option (switches apart), and the image sets only those."""
    help_text = subprocess.run(
        [sys.executable, "-m", "genrnn.cli", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    described = re.findall(r"^  --([a-z][a-z-]*)( [A-Z_]+| \{[^}]*\})?", help_text, flags=re.MULTILINE)
    options = {name for name, metavar in described if metavar and name != "help"}
    switches = {name for name, metavar in described if not metavar and name != "help"}
    script = (DOCKER / "entrypoint.sh").read_text()

    def listed(variable: str) -> set[str]:
        (names,) = re.findall(rf'^{variable}="([^"]*)"', script, flags=re.MULTILINE)
        return {name.lower().replace("_", "-") for name in names.split()}

    assert listed("SERVE_OPTIONS") == options
    assert listed("SERVE_SWITCHES") == switches
    assert {name.removeprefix("GENRNN_").lower().replace("_", "-") for name in image_environment()} <= options
    # compose passes every setting on from the shell or docker/.env, but those its own lines fix
    # (the bundle mounted at the image's GENRNN_MODEL, the address and the published port).
    environment = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["genrnn"]["environment"]
    # The key itself, and the host's port for the URL the entry script prints, are not options.
    shown = environment.pop("GENRNN_PUBLISHED_PORT")
    published = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["genrnn"]["ports"]
    assert published == [f"{shown}:8000"] and shown == "${GENRNN_PUBLISH_PORT:-8000}"
    passed = {name.removeprefix("GENRNN_").lower().replace("_", "-") for name in environment} - {"api-key"}
    assert passed == (options | switches) - {"model", "ensemble-averaging", "host", "port"}
    assert all(value == f"${{{name}:-}}" for name, value in environment.items())


def test_entry_script_runs_other_commands_as_they_are():
    """`docker run IMAGE genrnn generate ...` (or any command) runs that command, arguments intact."""
    script = image_command()[0]
    echoed = subprocess.run(
        [script, "sh", "-c", 'printf "%s|" "$@"', "sh", "two words", "--mode", "beam"],
        env=host_environment(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert echoed.returncode == 0 and echoed.stdout == "two words|--mode|beam|"
    usage = subprocess.run([script, "genrnn", "--help"], env=host_environment(), capture_output=True, text=True)
    assert usage.returncode == 0 and "serve" in usage.stdout


@pytest.mark.parametrize("arguments", [["--help"], ["serve", "--help"], ["serve", "-h"]])
def test_entry_script_shows_the_servers_help_without_a_bundle(arguments, tmp_path):
    environment = host_environment(GENRNN_MODEL=str(tmp_path / "no-bundle"))
    usage = subprocess.run([image_command()[0], *arguments], env=environment, capture_output=True, text=True)
    assert usage.returncode == 0, usage.stderr
    assert "--max-batch-size" in usage.stdout


def test_entry_script_passes_no_shortened_port_to_the_server(tmp_path, tiny_bundle):
    # The script checks whole names: the server must refuse a prefix, which argparse would take.
    # Into a file: the script's ready watcher keeps a pipe open while the server is unreaped.
    with (tmp_path / "stderr.txt").open("w") as errors:
        result = subprocess.run(
            [image_command()[0], "serve", "--por", "8933"],
            env=host_environment(GENRNN_MODEL=str(tiny_bundle)),
            stderr=errors,
            timeout=60,
        )
    assert result.returncode == 2
    assert "unrecognized arguments: --por 8933" in (tmp_path / "stderr.txt").read_text()


@pytest.mark.parametrize("argument", [["--port", "8933"], ["--port=8933"], ["--host", "0.0.0.0"]])
def test_entry_script_refuses_a_port_or_host_its_health_check_would_not_follow(argument):
    result = subprocess.run(
        [image_command()[0], "serve", *argument], env=host_environment(), capture_output=True, text=True
    )
    name = argument[0].split("=")[0].removeprefix("--").upper()
    assert result.returncode == 2
    assert (
        result.stderr
        == f"genrnn: set GENRNN_{name} instead of {argument[0]}: the health check and this script read it\n"
    )


def test_entry_script_names_the_missing_bundle(tmp_path, tiny_bundle):
    missing = tmp_path / "no-bundle"
    for model in (str(missing), f"{tiny_bundle}, {missing}"):  # alone, or a member of an ensemble
        result = subprocess.run(
            [image_command()[0]], env=host_environment(GENRNN_MODEL=model), capture_output=True, text=True
        )
        assert result.returncode != 0
        assert f"no bundle at {missing} (genrnn.json missing)" in result.stderr
    # An ensemble whose members are all there passes on to the server, as does one bundle whose directory's
    # name holds a comma (genrnn reads it as that bundle): here the server refuses a queue of no places.
    # Into a file: the script's ready watcher keeps a pipe open for as long as the server's process is unreaped.
    comma = shutil.copytree(tiny_bundle, tmp_path / "tiny,v2")
    for model in (f"{tiny_bundle},{tiny_bundle}", str(comma)):
        environment = host_environment(GENRNN_MODEL=model, GENRNN_MAX_QUEUE="0")
        with (tmp_path / "said.txt").open("w") as output:
            status = subprocess.run([image_command()[0]], env=environment, stderr=output, timeout=60)
        said = (tmp_path / "said.txt").read_text()
        assert status.returncode != 0 and "--max-queue: must be at least 1" in said and "no bundle" not in said, said


# -- Prometheus ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory) -> Iterator[str]:
    """Debian's Prometheus on loopback, scraping the server with docker/prometheus.yml's job,
    pointed at the test's port and scraping every second. Yields its base URL."""
    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        pytest.skip("Prometheus is not installed (Debian package 'prometheus'; .ci/run installs it with apt-get)")
    directory = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "genrnn"]
    job["scrape_interval"] = "1s"
    job["static_configs"] = [{"targets": [server.removeprefix("http://")]}]
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    subprocess.run(["promtool", "check", "config", str(directory / "prometheus.yml")], check=True, capture_output=True)
    port = free_port()
    log = directory / "prometheus.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert process.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200

        wait_for(ready, 60, "Prometheus to be ready")
        yield url
    finally:
        stop_process_group(process)


def query(prometheus_url: str, promql: str) -> list[dict]:
    reply = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": promql}, timeout=10)
    body = reply.json()
    assert body["status"] == "success", f"{promql}: {body.get('error')}"
    return body["data"]["result"]


def test_prometheus_config_is_valid():
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus'; .ci/run installs it with apt-get)")
    result = subprocess.run(["promtool", "check", "config", str(DOCKER / "prometheus.yml")], capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_request_counts(server, prometheus):
    """The scrape target is up, and Prometheus reports the requests this test made, by mode."""

    def genrnn_targets_up() -> bool:
        targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        return any(t["labels"]["job"] == "genrnn" and t["health"] == "up" for t in targets)

    wait_for(genrnn_targets_up, 30, "the genrnn scrape target to be up")

    before = requests_by_mode(httpx.get(f"{server}/metrics", timeout=5).text)
    sent = {"greedy": 3, "beam": 2, "sample": 1}
    for mode, count in sent.items():
        for i in range(count):
            assert generate(server, inputs=[f"word{i}"], mode=mode, seed=i).status_code == 200
    expected = {mode: before.get(mode, 0) + count for mode, count in sent.items()}

    def counts_in_prometheus() -> dict[str, float] | None:
        result = query(prometheus, "sum by (mode) (genrnn_requests_total)")
        counts = {r["metric"]["mode"]: float(r["value"][1]) for r in result}
        return counts if all(counts.get(mode) == n for mode, n in expected.items()) else None

    wait_for(counts_in_prometheus, 30, f"Prometheus to report {expected} requests by mode")


def test_dashboard_queries_what_the_server_exports(server, prometheus):
    """Every metric the dashboard queries is on a live /metrics page, every DESIGN.md metric is on
    the dashboard, and Prometheus evaluates every panel's query to data."""
    queries = dashboard_queries()
    queried = {name for expr in queries for name in re.findall(r"\bgenrnn_[a-z_]+", expr)}
    assert generate(server, inputs=["cat", "dog"], mode="greedy").status_code == 200
    exported = sample_names(httpx.get(f"{server}/metrics", timeout=5).text)
    assert queried <= exported, f"not exported by the server: {sorted(queried - exported)}"
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in queried}
    assert DESIGN_METRICS <= families, f"not on the dashboard: {sorted(DESIGN_METRICS - families)}"

    for expr in queries:
        # Grafana fills in $__rate_interval; anything else would be a variable the dashboard lacks.
        promql = expr.replace("$__rate_interval", "1m")
        assert "$" not in promql, expr
        wait_for(lambda promql=promql: query(prometheus, promql), 30, f"data for {promql}")


# -- compose ---------------------------------------------------------------------------------------


def test_compose_file_references_files_that_exist():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"genrnn", "prometheus", "grafana"} <= set(services)

    build = services["genrnn"]["build"]
    context = (DOCKER / build["context"]).resolve()
    assert context == ROOT and (context / build["dockerfile"]).is_file()
    assert services["genrnn"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]

    makefile = (ROOT / "Makefile").read_text()
    default_bundle = re.search(r"^RUN_DIR \?= (\S+)", makefile, flags=re.MULTILINE).group(1) + "/bundle"
    named_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            if isinstance(volume, dict):  # the long form
                source, target = env_default(volume["source"]), volume["target"]
            else:
                source, target = env_default(volume).split(":")[:2]
            if source in named_volumes:
                continue
            if target == "/models/bundle":
                # Made by training, not shipped: it must be where `make bundle` writes it, and a
                # missing one must not be made (by root, as an empty folder) by Docker.
                assert (DOCKER / source).resolve() == ROOT / default_bundle, volume
                assert volume["bind"]["create_host_path"] is False and volume["read_only"] is True
                continue
            assert (DOCKER / source).exists(), f"{name}: {volume} mounts a path that does not exist"

    # Prometheus reads the mounted scrape config, whose target is the service's port.
    command = services["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in command
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    exposed = [args for keyword, args in runtime_stage() if keyword == "EXPOSE"]
    assert job["static_configs"][0]["targets"] == [f"genrnn:{exposed[0]}"]

    # Grafana's provisioning points at the mounted dashboards and at the Prometheus service.
    provisioning = DOCKER / "grafana" / "provisioning"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "genrnn.yml").read_text())["providers"]
    mounts = dict(env_default(v).split(":")[:2][::-1] for v in services["grafana"]["volumes"])
    assert (DOCKER / mounts[provider["options"]["path"]] / DASHBOARD.name).is_file()
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    uids = {t["datasource"]["uid"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]}
    assert uids == {datasource["uid"]}


def test_image_installs_torch_first_as_a_non_root_user():
    instructions = dockerfile_instructions(DOCKER / "Dockerfile")
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    torch_step = next(i for i, args in enumerate(runs) if '"torch==' in args)
    project_step = next(i for i, args in enumerate(runs) if "pip install /src" in args)
    assert torch_step < project_step, "torch must be in place before the project pulls one"
    assert "download.pytorch.org/whl/cpu" in runs[torch_step]
    makefile_torch = re.search(r"^TORCH_VERSION \?= (\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1)
    assert f"ARG TORCH_VERSION={makefile_torch}" in [f"{k} {a}" for k, a in instructions]

    stage = dict(runtime_stage())
    assert stage["USER"] not in ("root", "0")
    # A baked bundle is copied as root with its own modes: it must be left readable for that user.
    (bake,) = [args for keyword, args in runtime_stage() if keyword == "RUN" and "/models/bundle" in args]
    assert bake.index("chmod -R a+rX /models/bundle") < bake.index("load_bundle")
    assert stage["EXPOSE"] == "8000" and stage["STOPSIGNAL"] == "SIGTERM"


# -- the quickstart --------------------------------------------------------------------------------


@pytest.mark.slow
def test_make_run_trains_serves_and_prints_a_curl_that_works(tmp_path):
    """`make run` with no bundle: trains (a 15-second budget here), serves, prints the URL and a
    curl command; that command answers; Ctrl-C stops everything."""
    if shutil.which("make") is None or shutil.which("curl") is None:
        pytest.skip("needs make and curl")
    if not (VENV_BIN / "genrnn").is_file():
        pytest.skip(f"needs the tests to run in the project's virtualenv ({VENV_BIN} has no genrnn)")
    port = free_port()
    venv = VENV_BIN.parent
    log = tmp_path / "make-run.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            # -o: the venv at hand counts as set up (setup is `make test`'s own first step).
            ["make", "--no-print-directory", "-o", f"{venv}/bin/genrnn", "run", f"VENV={venv}"]
            + [f"RUN_DIR={tmp_path / 'run'}", "GENRNN_TRAIN_TIME=00:00:00:15", f"GENRNN_PORT={port}"],
            cwd=ROOT,
            env=host_environment(),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def announced() -> str | None:
            assert process.poll() is None, f"make run exited:\n{log.read_text()[-3000:]}"
            found = re.search(r"^\s*try:\s+(curl .*)$", log.read_text(), flags=re.MULTILINE)
            return found.group(1) if found else None

        curl = wait_for(announced, 420, "make run to train, serve and print a curl command", interval=1)
        text = log.read_text()
        assert f"No bundle at {tmp_path / 'run'}/bundle" in text
        assert "Epoch 0" in text, "training shows its progress"
        assert f"http://127.0.0.1:{port}" in text

        reply = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=60)
        assert reply.returncode == 0, reply.stderr
        outputs = json.loads(reply.stdout)["outputs"]
        assert [o["input"] for o in outputs] == ["cat", "dog"]
        # Fifteen seconds of training teach little: the reply's shape is what counts here.
        assert all({"text", "tokens", "finish_reason"} <= set(o["candidates"][0]) for o in outputs)
    finally:
        # Ctrl-C in a terminal signals the whole foreground process group.
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
        stop_process_group(process, sig=signal.SIGINT)
    assert (tmp_path / "run" / "bundle" / "genrnn.json").is_file()
