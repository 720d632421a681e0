"""The serving processes (`run`): a parent that owns the port and ``serve.workers`` uvicorn
workers, each with its own copy of the model.

- **The port.** The parent binds one SO_REUSEPORT socket per worker slot, after checking
  that nothing else listens on the port (`bind_port`), and hands each worker its slot's
  socket: the kernel spreads connections over the slots, and a second start on the same port
  fails instead of joining it.
- **Supervision.** A worker that dies is started again on its slot's socket (connections
  that reach the slot meanwhile wait in its queue); `WorkerBoard` tells ``/health`` how many
  workers accept connections. SIGTERM or Ctrl-C stops every worker gracefully.
- **Hot reload.** SIGHUP loads the checkpoint that the config names now (``ckpt_path``
  re-read, ``run_dir``'s best, the newest run for ``run_dir=latest``) slot by slot: a new
  worker starts on the slot's socket, and once it accepts connections the old one finishes
  its requests and stops. A checkpoint of other data is refused and the served one kept.
- **Metrics.** The parent makes the folder of prometheus_client's multiprocess mode, marks
  dead workers in it, and removes it at exit (`recsys.serve.ops`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path

import uvicorn
from omegaconf import DictConfig, OmegaConf
from prometheus_client.multiprocess import mark_process_dead
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from recsys.checkpoint import checkpoint_from_config, checkpoint_state, data_state
from recsys.console import quiet_libraries
from recsys.data.identity import describe_changes, settings_changes
from recsys.data.spec import FeatureSpec
from recsys.errors import InputError
from recsys.scoring import require_pairs
from recsys.serve import ops
from recsys.serve.app import app_from_config
from recsys.serve.dependencies import Limits

log = logging.getLogger(__name__)

PORT_LOCK_SECONDS = 10  # the longest a start waits for another start on the same port to bind it
RESTART_DELAY_MAX = 30.0  # seconds between tries for a worker that keeps dying as it starts
DRAIN_SECONDS = 0.5  # a stopping worker's pause between no longer accepting and closing idle
# connections: a request on a connection it accepted just before gets in


class RequestDeadline:
    """Mixed into uvicorn's HTTP protocol: a connection has ``request_timeout`` seconds, from
    its opening or its previous response, to send a whole request (headers and body), or it
    is closed. uvicorn times out only keep-alive connections idle after a response: one that
    never sends a request, or trickles its headers, would be held forever."""

    request_timeout: float

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._request_received():
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._request_received():  # else a pipelined request is already in
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _request_received(self) -> bool:
        cycle = self.cycle
        return cycle is not None and not cycle.response_complete and not cycle.more_body

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def request_deadline_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, else h11) with `RequestDeadline`."""
    if seconds <= 0:
        raise InputError(f"serve.request_timeout={seconds} must be a positive number of seconds")
    return type(
        "DeadlineHTTPProtocol",
        (RequestDeadline, AutoHTTPProtocol),
        {"request_timeout": float(seconds)},
    )


class ReadyServer(uvicorn.Server):
    """A uvicorn server that calls ``on_ready()`` once it accepts connections (its app
    started, its sockets listening), stops when its parent ``parent_pid`` is gone, and on
    shutdown stops accepting before it closes idle connections."""

    def __init__(
        self,
        config: uvicorn.Config,
        on_ready: Callable[[], None],
        parent_pid: int | None = None,
        drain_seconds: float = 0.0,
    ):
        super().__init__(config)
        self.on_ready = on_ready
        self.parent_pid = parent_pid
        self.drain_seconds = drain_seconds

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.on_ready()

    async def on_tick(self, counter: int) -> bool:
        orphaned = self.parent_pid is not None and os.getppid() != self.parent_pid
        return orphaned or await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # the other processes on the socket take new connections
            server.close()
        await asyncio.sleep(self.drain_seconds)
        await super().shutdown(sockets=sockets)


def listening_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening socket with SO_REUSEPORT: one per worker slot on the same port, and the
    kernel spreads the connections over them (with one shared socket, as uvicorn's own
    workers have, the first worker to wake accepts a whole burst)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


@contextlib.contextmanager
def _port_lock(port: int) -> Iterator[None]:
    """Two starts on one port check and bind it one after the other (a lock file of this
    user's; a start that waits for it more than ``PORT_LOCK_SECONDS`` is refused)."""
    path = Path(tempfile.gettempdir()) / f"recsys-serve-{os.getuid()}-{port}.lock"
    with path.open("a") as f:
        deadline = time.monotonic() + PORT_LOCK_SECONDS
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise InputError(
                        f"port {port}: another start of recsys.serve has held {path} for "
                        f"{PORT_LOCK_SECONDS} s; stop it, or pass another serve.port=..."
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def bind_port(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` sockets of `listening_socket` on ``host:port``, once a socket without
    SO_REUSEPORT could bind there: a port that another process listens on (another
    recsys.serve included, whose sockets would otherwise take this one's into their group)
    is refused.

    Raises:
        InputError: naming ``host:port`` and what to do.
    """
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with _port_lock(port):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
                probe.bind((host, port))
            return [listening_socket(host, port) for _ in range(count)]
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise InputError(
                    f"{where} is in use: another process (another recsys.serve?) listens "
                    f"there. Pass another serve.port=..., or stop that process first"
                ) from None
            raise InputError(
                f"cannot listen on {where}: {e.strerror}. Check serve.host and serve.port"
            ) from None


def uvicorn_config(app, s: DictConfig) -> uvicorn.Config:
    """The uvicorn settings of ``serve`` (``s``): timeouts, concurrency limit, access log."""
    config = uvicorn.Config(
        app,
        log_level=s.log_level,
        access_log=s.access_log,
        http=request_deadline_protocol(s.request_timeout),
        timeout_keep_alive=s.timeout_keep_alive,
        limit_concurrency=s.limit_concurrency,
        timeout_graceful_shutdown=s.timeout_graceful_shutdown,
    )
    if s.access_log:  # uvicorn sets its access logger to log_level: its lines are info
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    return config


def serve_worker(
    config_yaml: str,
    sock: socket.socket,
    board: ops.WorkerBoard,
    messages: multiprocessing.Queue,
    parent_pid: int,
) -> None:
    """One worker process: loads the model, serves it on ``sock`` (its slot's socket), and
    puts ``(pid, <what it serves>)`` on ``messages`` once it accepts connections."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads are the parent's
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it (uvicorn takes over)
    cfg = OmegaConf.create(config_yaml)
    start = time.perf_counter()
    app = app_from_config(cfg)
    s = cfg.serve
    ops.instrument(app, s.metrics_public, board, load_seconds=time.perf_counter() - start)
    server = ReadyServer(
        uvicorn_config(app, s),
        lambda: messages.put((os.getpid(), app.state.summary)),
        parent_pid=parent_pid,
        drain_seconds=DRAIN_SECONDS,
    )
    server.run(sockets=[sock])


def servable_checkpoint(cfg: DictConfig) -> str:
    """The checkpoint that ``cfg`` names now (`checkpoint_from_config`, symlinks resolved),
    refused when its data has no ids or has row features (`require_pairs`)."""
    path = Path(checkpoint_from_config(cfg)).resolve()
    spec = checkpoint_state(path)["hyper_parameters"]["spec"]
    require_pairs(FeatureSpec.from_dict(spec), "serve")
    return str(path)


def data_identity(ckpt_path: str | Path) -> tuple[str | None, dict]:
    """The processed data folder and data settings that a checkpoint was trained on."""
    state = checkpoint_state(Path(ckpt_path))
    data = data_state(state) or {}
    return data.get("processed"), dict(data.get("settings") or {})


def data_changes(served: str | Path, new: str | Path) -> dict:
    """`settings_changes` from the served checkpoint's data to the new one's (or the processed
    folders, when the settings agree and the folders differ); empty for the same data."""
    old_folder, old_settings = data_identity(served)
    new_folder, new_settings = data_identity(new)
    changes = settings_changes(old_settings, new_settings)
    if not changes and old_folder != new_folder:
        changes = {"processed data": (old_folder, new_folder)}
    return changes


@dataclass(eq=False)
class Worker:
    """A worker process on ``slot``: ``current`` (the slot's), ``next`` (a reload's, not
    yet ready) or ``retiring`` (stopping after a reload)."""

    process: BaseProcess
    slot: int
    config_yaml: str
    role: str = "current"
    ready: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid


class Supervisor:
    """Starts the workers, restarts those that die, reloads on SIGHUP, stops on SIGTERM or
    SIGINT (`serve`)."""

    def __init__(self, cfg: DictConfig, source: DictConfig, sockets: list[socket.socket]):
        self.cfg, self.source, self.sockets = cfg, source, sockets
        self.context = multiprocessing.get_context("spawn")
        self.board = ops.WorkerBoard.create(self.context, len(sockets))
        self.messages = self.context.Queue()
        self.workers: list[Worker] = []
        self.failures = [0] * len(sockets)  # starts in a row that died before serving
        self.restart_at: dict[int, tuple[float, str]] = {}  # slot -> when, with what config
        self.summary = ""  # what the workers serve, for the log
        self.serving = False  # every slot served once
        self.failed: str | None = None  # why the first start failed
        self.stopping = self.reload_asked = False

    # --- processes ----------------------------------------------------------------------
    def start(self, slot: int, config_yaml: str, role: str = "current") -> Worker:
        process = self.context.Process(
            target=serve_worker,
            args=(config_yaml, self.sockets[slot], self.board, self.messages, os.getpid()),
            name=f"recsys-serve-{slot}",
        )
        process.start()
        worker = Worker(process, slot, config_yaml, role)
        self.workers.append(worker)
        return worker

    def current(self, slot: int) -> Worker | None:
        return next((w for w in self.workers if w.slot == slot and w.role == "current"), None)

    def poll(self, timeout: float = 0.2) -> None:
        """Take the workers' ready messages, handle the workers that exited, start the
        restarts that are due."""
        with contextlib.suppress(queue.Empty):
            self.ready(*self.messages.get(timeout=timeout))
            while True:
                self.ready(*self.messages.get_nowait())
        for worker in [w for w in self.workers if not w.process.is_alive()]:
            self.exited(worker)
        now = time.monotonic()
        for slot, (when, config_yaml) in list(self.restart_at.items()):
            if when <= now and not self.stopping:
                del self.restart_at[slot]
                self.board.restarted(slot)
                self.start(slot, config_yaml)

    def ready(self, pid: int, summary: str) -> None:
        worker = next((w for w in self.workers if w.pid == pid), None)
        if worker is None:
            return
        worker.ready, self.summary = True, summary
        if worker.role == "current":
            self.board.set_ready(worker.slot, True)
            if self.serving:
                log.info(
                    "worker %d (pid %d) is back: %d of %d ready",
                    worker.slot,
                    pid,
                    self.board.ready,
                    self.board.workers,
                )
            self.failures[worker.slot] = 0

    def exited(self, worker: Worker) -> None:
        worker.process.join()
        self.workers.remove(worker)
        pid, code = worker.pid, worker.process.exitcode
        mark_process_dead(pid)
        if worker.role != "current" or self.stopping:
            return  # a retired worker, a reload's failed worker (`roll` says), or a stop
        self.board.set_ready(worker.slot, False)
        if not self.serving:
            self.failed = f"worker {worker.slot} (pid {pid}) exited with code {code}"
            return
        if not worker.ready:
            self.failures[worker.slot] += 1
        delay = min(RESTART_DELAY_MAX, 2.0 ** self.failures[worker.slot] - 1)
        log.error(
            "worker %d (pid %d) exited with code %s; starting it again%s (%d of %d ready)",
            worker.slot,
            pid,
            code,
            f" in {delay:.0f} s" if delay else "",
            self.board.ready,
            self.board.workers,
        )
        self.restart_at[worker.slot] = (time.monotonic() + delay, worker.config_yaml)

    # --- the whole --------------------------------------------------------------------
    def serve(self, announce: Callable[[str], None]) -> None:
        """Serve until SIGTERM or SIGINT; raises `RuntimeError` if a worker exits before
        every worker served."""
        handlers = {
            sig: signal.signal(sig, self.on_signal)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        self.cfg_yaml = OmegaConf.to_yaml(self.cfg, resolve=True)
        try:
            for slot in range(len(self.sockets)):
                self.start(slot, self.cfg_yaml)
            while not (self.stopping or self.failed) and self.board.ready < self.board.workers:
                self.poll()
            if self.failed:
                raise RuntimeError(f"{self.failed} before it served; see the log above")
            if self.stopping:
                return
            self.serving = True
            announce(self.summary)
            while not self.stopping:
                self.poll()
                if self.reload_asked:
                    self.reload_asked = False
                    self.reload()
        finally:
            self.stop()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def on_signal(self, signum: int, _frame) -> None:
        if signum == signal.SIGHUP:
            self.reload_asked = True
        else:
            self.stopping = True

    def stop(self) -> None:
        """SIGTERM to every worker (uvicorn finishes the requests in flight), SIGKILL to
        those still running ``serve.timeout_graceful_shutdown`` + 10 s later."""
        self.stopping = True
        for worker in self.workers:
            if worker.process.is_alive():
                os.kill(worker.pid, signal.SIGTERM)
        for sock in self.sockets:
            sock.close()
        deadline = time.monotonic() + (self.cfg.serve.timeout_graceful_shutdown or 30) + 10
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.error("worker %d (pid %d) did not stop: killed", worker.slot, worker.pid)
                worker.process.kill()
                worker.process.join()

    # --- reload -------------------------------------------------------------------------
    def reload(self) -> None:
        """Serve the checkpoint that the config names now, slot by slot (`roll`); refused
        (logged, the served model kept) when it cannot be served or holds other data."""
        served = self.cfg.ckpt_path
        try:
            ckpt = servable_checkpoint(self.source)
            changes = data_changes(served, ckpt)
        except Exception as e:  # a file that is not a checkpoint fails in many ways
            log.error("reload refused: %s; still serving %s", e, served)
            return
        if changes:
            log.error(
                "reload refused: %s was trained on other data than the served %s (%s); "
                "still serving %s",
                ckpt,
                served,
                describe_changes(changes),
                served,
            )
            return
        log.info("reloading %s (was %s), worker by worker", ckpt, served)
        cfg = self.cfg.copy()
        cfg.ckpt_path = ckpt
        new_yaml, old_yaml = OmegaConf.to_yaml(cfg, resolve=True), self.cfg_yaml
        rolled = self.roll(new_yaml)
        if rolled < len(self.sockets):
            if rolled and not self.stopping:  # back to one model on every slot
                self.roll(old_yaml, range(rolled))
            if not self.stopping:
                log.error("reload failed: see the worker's log above; still serving %s", served)
            return
        self.cfg, self.cfg_yaml = cfg, new_yaml
        log.info("reloaded: serving %s on %d workers", ckpt, len(self.sockets))

    def roll(self, config_yaml: str, slots: range | None = None) -> int:
        """Start a worker of ``config_yaml`` on each slot in turn and, once it accepts
        connections, stop the slot's old worker: the number of slots done (all, unless a new
        worker exited before it served or a stop came)."""
        slots = range(len(self.sockets)) if slots is None else slots
        for done, slot in enumerate(slots):
            new = self.start(slot, config_yaml, role="next")
            while new.process.is_alive() and not new.ready and not self.stopping:
                self.poll()
            if not new.ready or self.stopping:
                if new.process.is_alive():
                    new.process.terminate()
                return done
            old = self.current(slot)
            new.role = "current"
            self.board.set_ready(slot, True)
            self.restart_at.pop(slot, None)
            if old is not None:
                old.role = "retiring"
                if old.process.is_alive():
                    os.kill(old.pid, signal.SIGTERM)
        return len(slots)


def run(cfg: DictConfig) -> None:
    """Serve until stopped (Ctrl-C or SIGTERM): ``serve.workers`` processes, each with its
    own copy of the model, on one port (`Supervisor`). Logs ``ready: serving ...`` once every
    worker accepts connections; SIGHUP reloads the checkpoint (`Supervisor.reload`)."""
    s = cfg.serve
    quiet_libraries()
    if s.workers < 1:
        raise InputError(f"serve.workers={s.workers} must be at least 1")
    source = cfg.copy()  # what names the checkpoint: read again on SIGHUP
    cfg.ckpt_path = servable_checkpoint(cfg)
    request_deadline_protocol(s.request_timeout)  # a bad value refused here, not per worker
    Limits.from_config(s)  # bad request limits or API key: refused before any worker starts
    workers_text = f"{s.workers} worker{'s' if s.workers > 1 else ''}"
    sockets = bind_port(s.host, s.port, s.workers)
    log.info("loading %s (%s)", cfg.ckpt_path, workers_text)

    def announce(model: str) -> None:
        log.info(
            "ready: serving %s on http://%s:%d (%s, %s, API key %s)",
            model,
            f"[{s.host}]" if ":" in s.host else s.host,
            s.port,
            cfg.ckpt_path,
            workers_text,
            "required" if s.api_key else "off",
        )

    metrics_dir = tempfile.mkdtemp(prefix="recsys-serve-metrics-")
    os.environ[ops.MULTIPROC_DIR] = metrics_dir  # before the workers import prometheus_client
    try:
        Supervisor(cfg, source, sockets).serve(announce)
    finally:
        os.environ.pop(ops.MULTIPROC_DIR, None)
        shutil.rmtree(metrics_dir, ignore_errors=True)
