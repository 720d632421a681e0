"""The serving processes: ``serve.workers`` uvicorn servers, each with its own copy of the
model and its own socket on the shared port, started and stopped together (`run`)."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import uvicorn
from omegaconf import DictConfig, OmegaConf

from recsys.checkpoint import checkpoint_from_config, checkpoint_state
from recsys.console import quiet_libraries
from recsys.data.spec import FeatureSpec
from recsys.errors import InputError
from recsys.scoring import require_pairs
from recsys.serve.app import app_from_config
from recsys.serve.dependencies import Limits

log = logging.getLogger(__name__)


class ReadyServer(uvicorn.Server):
    """A uvicorn server that calls ``on_ready()`` once it accepts connections (its app
    started, its sockets listening)."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None]):
        super().__init__(config)
        self.on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.on_ready()


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound with SO_REUSEPORT: each worker process binds its own, and the kernel
    spreads the connections over them. (With one shared socket, as uvicorn's own workers
    have, the first worker to wake accepts every connection of a burst: under a load test
    one worker served all 16 keep-alive clients while the other idled.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def serve_worker(config_yaml: str, ready: Callable[[str], None]) -> None:
    """One serving process: its own model, its own socket on the shared port (bound once the
    model is loaded); calls ``ready(<what it serves>)`` when it accepts connections."""
    cfg = OmegaConf.create(config_yaml)
    s = cfg.serve
    app = app_from_config(cfg)
    config = uvicorn.Config(app, log_level=s.log_level, access_log=False)
    server = ReadyServer(config, lambda: ready(app.state.summary))
    server.run(sockets=[listening_socket(s.host, s.port)])


def run(cfg: DictConfig) -> None:
    """Serve until stopped (Ctrl-C or SIGTERM): ``serve.workers`` processes, each with its
    own copy of the model, on one port. Logs ``ready: serving ...`` once every worker
    accepts connections."""
    s = cfg.serve
    quiet_libraries()
    cfg.ckpt_path = checkpoint_from_config(cfg)
    if s.workers < 1:
        raise InputError(f"serve.workers={s.workers} must be at least 1")
    Limits.from_config(s)  # bad request limits or API key: refused before any worker starts
    # refused before any worker starts: data without ids or with row features
    spec = checkpoint_state(Path(cfg.ckpt_path))["hyper_parameters"]["spec"]
    require_pairs(FeatureSpec.from_dict(spec), "serve")
    workers_text = f"{s.workers} worker{'s' if s.workers > 1 else ''}"
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

    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    if s.workers == 1:
        serve_worker(config_yaml, announce)
        return
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Queue()
    workers = [
        spawn.Process(target=serve_worker, args=(config_yaml, ready.put)) for _ in range(s.workers)
    ]
    for w in workers:
        w.start()

    def stop(signum, _frame) -> None:
        for w in workers:
            if w.is_alive():
                os.kill(w.pid, signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    started: list[str] = []
    while len(started) < len(workers) and all(w.is_alive() for w in workers):
        with contextlib.suppress(queue.Empty):
            started.append(ready.get(timeout=0.5))
    if len(started) == len(workers):
        announce(started[0])
    else:  # a worker stopped before it served: stop the others too
        stop(signal.SIGTERM, None)
    for w in workers:
        w.join()
    # uvicorn re-raises the signal it stopped on: -SIGTERM / -SIGINT are clean stops
    failed = [w.exitcode for w in workers if w.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT)]
    if failed:
        raise RuntimeError(f"serving workers exited with codes {failed}; see the log above")
