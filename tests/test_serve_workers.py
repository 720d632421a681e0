"""The serving processes (`recsys.serve.workers`) and what they report (`recsys.serve.ops`):
the port refused when in use, connections that send nothing closed, the concurrency limit,
Prometheus metrics; and, with real server processes (slow), worker restarts, readiness, a
rolling reload on SIGHUP, the access log and a clean stop.

The model is the NeuMF checkpoint of `tests/test_compat.py` (no training here)."""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from omegaconf import DictConfig

from recsys.errors import InputError
from recsys.recommender import Recommender
from recsys.serve import create_app, ops
from recsys.serve.workers import ReadyServer, bind_port, listening_socket, uvicorn_config
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
NEUMF = ROOT / "tests" / "fixtures" / "main-c8cca92-neumf-ml100k.ckpt"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve_cfg(data_dir, cache_dir, tmp_path) -> DictConfig:
    return compose_cfg("serve", data_dir, cache_dir, tmp_path, f"ckpt_path={NEUMF}")


# --- the port ------------------------------------------------------------------------------
def test_a_port_in_use_is_refused_naming_it(serve_cfg):
    """A plain listener, or a server's SO_REUSEPORT socket (which a second server's sockets
    would join), on the port: `bind_port` refuses it and says what to do."""
    port = _free_port()
    for listen in (socket.create_server, lambda a: listening_socket(*a)):
        with listen(("127.0.0.1", port)), pytest.raises(InputError) as e:
            bind_port("127.0.0.1", port, 2)
        assert f"127.0.0.1:{port} is in use" in str(e.value)
        assert "serve.port=" in str(e.value) and "stop that process" in str(e.value)
    sockets = bind_port("127.0.0.1", port, 2)  # free again: one socket per worker
    try:
        assert [s.getsockname()[1] for s in sockets] == [port, port]
        with pytest.raises(InputError, match="is in use"):
            bind_port("127.0.0.1", port, 1)  # nor joins its own sockets
    finally:
        for s in sockets:
            s.close()


# --- connections ---------------------------------------------------------------------------
@contextmanager
def running(app, cfg: DictConfig) -> Iterator[int]:
    """``app`` served by a `ReadyServer` with the uvicorn settings of ``cfg.serve``, in a
    thread: yields its port."""
    port, ready = _free_port(), threading.Event()
    server = ReadyServer(uvicorn_config(app, cfg.serve), ready.set)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [listening_socket("127.0.0.1", port)]}
    )
    thread.start()
    try:
        assert ready.wait(30), "the server did not start"
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def _tiny_app() -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict:
        return {"pong": True}

    return app


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (reads its answer, if any, on the way)."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    return time.monotonic() - start


def test_connections_that_do_not_send_a_request_in_time_are_closed(serve_cfg):
    """``serve.request_timeout`` from the opening or the last response: a silent connection,
    one that trickles its headers and a keep-alive connection that sends half a request are
    closed; one that asks in time is answered."""
    serve_cfg.serve.request_timeout = 0.5
    serve_cfg.serve.timeout_keep_alive = 30  # uvicorn's own idle timeout out of the way
    with running(_tiny_app(), serve_cfg) as port:
        silent = socket.create_connection(("127.0.0.1", port))
        trickle = socket.create_connection(("127.0.0.1", port))
        trickle.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n")  # never ends its headers
        again = socket.create_connection(("127.0.0.1", port), timeout=5)
        again.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b"pong" not in answer:  # answered (headers and body may come apart), kept alive
            answer += again.recv(4096)
        time.sleep(0.3)
        again.sendall(b"GET /ping HTTP/1.1\r\n")  # the next request, never finished
        for sock in (silent, trickle, again):
            with sock:
                assert _closed_within(sock, 5) is not None
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(3):  # keep-alive requests sooner than the deadline, one connection
                assert client.get("/ping").json() == {"pong": True}
                time.sleep(0.3)


def test_beyond_the_concurrency_limit_requests_answer_503(serve_cfg):
    serve_cfg.serve.limit_concurrency = 2
    with running(_tiny_app(), serve_cfg) as port:
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/ping").status_code == 200
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        try:
            time.sleep(0.2)  # accepted
            assert httpx.get(f"{base}/ping").status_code == 503
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.2)
        assert httpx.get(f"{base}/ping").status_code == 200


# --- metrics -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rec(data_dir, cache_dir, tmp_path_factory) -> Recommender:
    out = tmp_path_factory.mktemp("serve")
    return Recommender.from_config(
        compose_cfg("serve", data_dir, cache_dir, out, f"ckpt_path={NEUMF}"), "serve"
    )


def _samples(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric in Prometheus' text format."""
    found = re.findall(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, flags=re.MULTILINE)
    return {labels: float(value) for labels, value in found}


def test_metrics_count_requests_by_route_and_status_behind_the_api_key(rec):
    app = create_app(rec, api_key="k")
    ops.instrument(app, load_seconds=1.5)
    client, key = TestClient(app), {"X-API-Key": "k"}
    before = client.get("/metrics", headers=key).text
    client.get("/recommend?user_id=1&k=3", headers=key)
    client.get("/recommend?user_id=424242", headers=key)
    client.get("/no/such/path", headers=key)
    assert client.get("/metrics").status_code == 401  # behind the key
    text = client.get("/metrics", headers=key).text
    requests = _samples(text, "recsys_requests_total")
    old = _samples(before, "recsys_requests_total")

    def added(route: str, status: int) -> float:
        labels = f'{{method="GET",route="{route}",status="{status}"}}'
        return requests.get(labels, 0) - old.get(labels, 0)

    assert added("/recommend", 200) == 1 and added("/recommend", 404) == 1
    assert added("unmatched", 404) == 1
    counts = _samples(text, "recsys_request_duration_seconds_count")
    assert counts['{method="GET",route="/recommend"}'] >= 2
    assert _samples(text, "recsys_model_load_seconds") == {"": 1.5}
    info = _samples(text, "recsys_model_info")
    expected = f'checkpoint="{NEUMF.name}",net="NeuMF",source="ml-100k",variant="neumf"'
    assert info[f"{{{expected}}}"] == 1.0

    public = create_app(rec, api_key="k")
    ops.instrument(public, metrics_public=True)
    assert TestClient(public).get("/metrics").status_code == 200


def test_health_says_ready_only_when_every_worker_is(rec):
    alone = TestClient(create_app(rec))  # served without the parent: one worker, ready
    assert alone.get("/health").json() == {"status": "ok", "workers": 1, "ready": 1}
    app = create_app(rec)
    board = ops.WorkerBoard.create(multiprocessing.get_context("spawn"), 2)
    ops.instrument(app, board=board)
    client = TestClient(app)
    board.set_ready(0, True)
    r = client.get("/health")
    assert r.status_code == 503 and r.json() == {"status": "not ready", "workers": 2, "ready": 1}
    board.set_ready(1, True)
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "workers": 2, "ready": 2}
    board.restarted(1)
    assert _samples(client.get("/metrics").text, "recsys_worker_restarts_total") == {
        '{slot="0"}': 0.0,
        '{slot="1"}': 1.0,
    }


# --- real server processes (slow) ----------------------------------------------------------
def _other_weights(src: Path, dst: Path) -> Path:
    """A copy of the checkpoint with other weights (same data): another model to reload."""
    state = torch.load(src, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for name, value in state["state_dict"].items():
        if value.is_floating_point():
            state["state_dict"][name] = value + torch.randn(value.shape, generator=generator)
    torch.save(state, dst)
    return dst


def _other_data(src: Path, dst: Path) -> Path:
    """A copy of the checkpoint whose data identity says another seed and processed folder."""
    state = torch.load(src, weights_only=True)
    data = next(v for v in state.values() if isinstance(v, dict) and "data_class" in v)
    data["settings"]["seed"] = data["settings"].get("seed", 0) + 1
    data["processed"] = data["processed"] + "-other"
    torch.save(state, dst)
    return dst


class Server:
    """``python -m recsys.serve`` with 2 workers in a subprocess; its log in ``log``."""

    def __init__(self, tmp: Path, cache_dir: Path, *overrides: str, port: int | None = None):
        self.port, self.log = port or _free_port(), tmp / "server.out"
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "RECSYS_API_KEY": "k1", "RECSYS_CACHE_DIR": str(cache_dir)}
        self.cmd = [sys.executable, "-m", "recsys.serve", f"serve.port={self.port}"]
        self.cmd += ["serve.workers=2", f"hydra.run.dir={tmp}", *overrides]
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                self.cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, what: str, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while what not in self.text():
            assert self.process.poll() is None, f"the server exited:\n{self.text()}"
            assert time.monotonic() < deadline, f"no {what!r} in {seconds} s:\n{self.text()}"
            time.sleep(0.1)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(f"{self.base}{path}", headers={"X-API-Key": "k1"}, **kwargs)

    def workers(self) -> list[int]:
        found = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True
        ).stdout
        pids = [int(p) for p in found.split()]
        # the spawn context's resource tracker is a child too: the workers run recsys-serve
        return [p for p in pids if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_dir, cache_dir) -> Iterator[Server]:
    """2 workers on ``<tmp>/current.ckpt``, a link to the NeuMF checkpoint; access log on."""
    tmp = tmp_path_factory.mktemp("served")
    shutil.copy(NEUMF, tmp / "a.ckpt")
    (tmp / "current.ckpt").symlink_to(tmp / "a.ckpt")
    server = Server(
        tmp,
        cache_dir,
        f"ckpt_path={tmp / 'current.ckpt'}",
        f"paths.data_dir={data_dir}",
        "serve.access_log=true",
    )
    server.folder = tmp
    try:
        server.wait_for("ready: serving")
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


@pytest.mark.slow
def test_a_second_server_on_the_port_exits_and_the_first_still_answers(server, cache_dir, tmp_path):
    second = Server(tmp_path, cache_dir, f"ckpt_path={NEUMF}", port=server.port)
    assert second.process.wait(timeout=120) == 2
    assert f"error: 127.0.0.1:{server.port} is in use" in second.text()
    assert "serve.port=" in second.text()
    for _ in range(6):  # new connections, over both workers: every one the first server's
        assert server.get("/metadata").json()["checkpoint"] == "a.ckpt"


@pytest.mark.slow
def test_a_killed_worker_is_started_again_and_health_waits_for_it(server):
    assert server.get("/health").json() == {"status": "ok", "workers": 2, "ready": 2}
    workers = server.workers()
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    server.wait_for(f"(pid {workers[0]}) exited with code -9")

    def health() -> int | None:  # a new connection: the kernel picks the slot
        try:
            return httpx.get(f"{server.base}/health", timeout=2).status_code
        except httpx.TimeoutException:  # the dead slot's queue waits for its new worker
            return None

    # the live worker answers while the other is down; 20 connections all landing on the
    # dead slot's queue has a chance of 2^-20
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: health(), range(20)))
    assert 503 in answers, answers
    deadline = time.monotonic() + 120
    while (r := httpx.get(f"{server.base}/health", timeout=120)).status_code != 200:
        assert time.monotonic() < deadline, f"not ready again in 120 s:\n{server.text()}"
        time.sleep(0.1)
    assert r.json() == {"status": "ok", "workers": 2, "ready": 2}
    assert f"(pid {workers[0]}) exited with code -9; starting it again" in server.text()
    assert len(set(server.workers()) - {workers[0]}) == 2
    restarts = _samples(server.get("/metrics").text, "recsys_worker_restarts_total")
    assert sum(restarts.values()) == 1


@pytest.mark.slow
def test_metrics_add_up_every_worker_and_the_access_log_has_each_request(server):
    def count() -> float:
        samples = _samples(server.get("/metrics").text, "recsys_requests_total")
        return samples.get('{method="GET",route="/recommend",status="200"}', 0.0)

    before = count()
    for _ in range(10):  # new connections: spread over both workers
        assert server.get("/recommend?user_id=1&k=3").status_code == 200
    assert count() - before == 10
    loads = _samples(server.get("/metrics").text, "recsys_model_load_seconds")
    assert len(loads) == 2  # one series per live worker, whichever worker answers
    assert server.text().count('"GET /recommend?user_id=1&k=3 HTTP/1.1" 200') >= 10
    assert httpx.get(f"{server.base}/metrics").status_code == 401


@pytest.mark.slow
def test_sighup_reloads_worker_by_worker_without_a_failed_request(server):
    tmp = server.folder
    link = tmp / "current.ckpt"
    new = _other_weights(tmp / "a.ckpt", tmp / "b.ckpt")
    before = server.get("/recommend?user_id=1&k=5").json()["items"]
    failures, answers, stop = [], [], threading.Event()

    def ask() -> None:
        while not stop.is_set():
            try:
                r = server.get("/metadata", timeout=30)  # a new connection each time
                if r.status_code == 200:
                    answers.append(r.json()["checkpoint"])
                else:
                    failures.append(r)
            except httpx.HTTPError as e:
                failures.append(e)

    client = threading.Thread(target=ask)
    client.start()
    try:
        link.unlink()
        link.symlink_to(new)
        server.process.send_signal(signal.SIGHUP)
        server.wait_for(f"reloaded: serving {new}")
        time.sleep(1)
    finally:
        stop.set()
        client.join()
    assert not failures
    assert answers[-1].endswith("b.ckpt") and any(a.endswith("a.ckpt") for a in answers)
    assert all(server.get("/metadata").json()["checkpoint"] == "b.ckpt" for _ in range(6))
    assert server.get("/recommend?user_id=1&k=5").json()["items"] != before
    assert server.get("/health").json()["ready"] == 2

    other = _other_data(tmp / "a.ckpt", tmp / "c.ckpt")
    link.unlink()
    link.symlink_to(other)
    server.process.send_signal(signal.SIGHUP)
    server.wait_for("reload refused")
    refused = next(line for line in server.text().splitlines() if "reload refused" in line)
    assert f"{other} was trained on other data than the served {new}" in refused
    assert "data.seed" in refused
    assert all(server.get("/metadata").json()["checkpoint"] == "b.ckpt" for _ in range(4))


@pytest.mark.slow
def test_sigterm_stops_every_worker_with_exit_code_0(server):
    workers = server.workers()
    assert workers
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    for pid in workers:  # gone (reaped by the parent)
        assert not Path(f"/proc/{pid}").exists()
