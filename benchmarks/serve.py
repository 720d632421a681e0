"""Load test of `python -m recsys.serve`: requests/s and latency per endpoint, server memory.

    python benchmarks/serve.py                  # ML-1M NeuMF and Book-Crossing DLRM
    python benchmarks/serve.py quick=true       # ML-100K NeuMF, 3 s per endpoint
    python benchmarks/serve.py ckpt=<ckpt> [clients=16] [seconds=20] [workers=2]

Each case trains its model first (a short run, unless ``ckpt`` is given), starts the server
as its own process on 127.0.0.1 (a free port), and drives each endpoint with ``clients``
concurrent keep-alive clients (aiohttp, asyncio) for ``seconds``: every client sends its next
request when the last one is answered. Requests use random known ids (seeded). Printed per
endpoint: requests/s, latency p50/p95/p99 (ms, measured by the client), errors; and the
server's peak resident memory (VmHWM, all its processes). The load is bounded in time and
sent to loopback only.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import pandas as pd
import uvloop
from omegaconf import DictConfig, OmegaConf

from recsys.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # name: training overrides
    "ml-1m NeuMF": ["experiment=ml1m_neumf", "trainer.max_epochs=3"],
    "Book-Crossing DLRM": ["data=books", "model=dlrm", "trainer.max_epochs=1"],
}
QUICK = {"ml-100k NeuMF": ["data=movielens", "data.variant=100k", "trainer.max_epochs=1"]}


def train(overrides: list[str], folder: Path) -> Path:
    """Train with ``train.py`` into ``folder``; returns the best checkpoint."""
    cmd = [sys.executable, "train.py", *overrides, f"hydra.run.dir={folder}"]
    cmd += ["callbacks.progress_bar.refresh_rate=0", "logger=none"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return Path(pd.read_json(folder / "metrics.json", typ="series")["best_model_path"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, port: int, args: DictConfig, folder: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "recsys.serve", f"ckpt_path={ckpt}", f"serve.port={port}"]
    cmd += [f"serve.workers={args.workers}", f"hydra.run.dir={folder}"]
    server = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.kill()
    raise RuntimeError("the server did not answer /health within 300 s")


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of the process and its children, in MB."""
    pids = [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    total = 0
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total / 1024


async def drive(base: str, make_request, clients: int, seconds: float, seed: int) -> dict:
    """``clients`` concurrent loops sending ``make_request(rng)`` -> (method, path, json)
    for ``seconds``; returns requests/s, latency percentiles and the number of errors.

    The client is aiohttp: it shares the machine's cores with the server, and costs about a
    tenth of the CPU per request that an httpx client does."""
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base, connector=connector) as session:

        async def send(rng: random.Random) -> int:
            method, path, body = make_request(rng)
            async with session.request(method, path, json=body) as response:
                await response.read()
                return response.status

        warm = random.Random(seed)
        await asyncio.gather(*(send(warm) for _ in range(2 * clients)))  # connections open
        stop = time.perf_counter() + seconds

        async def loop(i: int) -> None:
            nonlocal errors
            rng = random.Random(seed * 1000 + i)
            while time.perf_counter() < stop:
                t = time.perf_counter()
                status = await send(rng)
                latencies.append(time.perf_counter() - t)
                errors += status != 200

        start = time.perf_counter()
        await asyncio.gather(*(loop(i) for i in range(clients)))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {
        "requests/s": len(ms) / elapsed,
        "p50 ms": np.percentile(ms, 50),
        "p95 ms": np.percentile(ms, 95),
        "p99 ms": np.percentile(ms, 99),
        "requests": len(ms),
        "errors": errors,
    }


def endpoints(users: list[str], items: list[str]) -> dict:
    """Request makers per endpoint, drawing known ids with the client's generator."""
    return {
        "GET /recommend k=10": lambda r: (
            "GET",
            f"/recommend?user_id={r.choice(users)}&k=10",
            None,
        ),
        "POST /recommend 8 users k=10": lambda r: (
            "POST",
            "/recommend",
            {"user_ids": r.sample(users, 8), "k": 10},
        ),
        "GET /similar k=10": lambda r: ("GET", f"/similar?item_id={r.choice(items)}&k=10", None),
        "POST /score 100 pairs": lambda r: (
            "POST",
            "/score",
            {
                "pairs": [
                    {"user_id": r.choice(users), "item_id": r.choice(items)} for _ in range(100)
                ]
            },
        ),
    }


def bench_case(name: str, ckpt: Path, args: DictConfig, folder: Path) -> pd.DataFrame:
    port = free_port()
    server = start_server(ckpt, port, args, folder / "serve")
    try:
        base = f"http://127.0.0.1:{port}"
        meta = httpx.get(f"{base}/metadata").json()
        # known ids: the dataset's raw ids, read back from the server's own answers
        rng = np.random.default_rng(0)
        users, items = sample_ids(ckpt, meta, rng)
        rows = []
        for endpoint, make in endpoints(users, items).items():
            # uvloop (as the server runs): the client shares the 2 cores with the server
            figures = uvloop.run(drive(base, make, args.clients, args.seconds, seed=1))
            rows.append({"case": name, "endpoint": endpoint, **figures})
            print(f"  {endpoint}: {figures['requests/s']:.0f} req/s", flush=True)
        memory = peak_rss_mb(server.pid)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    frame = pd.DataFrame(rows)
    frame["server peak MB"] = memory
    print(
        f"{name}: {meta['data']['users']:,} users, {meta['data']['items']:,} items scored per "
        f"request, {args.clients} clients, {args.workers} worker(s)"
    )
    return frame


def sample_ids(ckpt: Path, meta: dict, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Up to 2,000 raw user ids and item ids of the checkpoint's data (its processed folder,
    where the server finds it)."""
    value = os.environ.get("RECSYS_DATA_DIR")
    cache = os.environ.get("RECSYS_CACHE_DIR", str(ROOT / "cache"))
    cfg = OmegaConf.create(
        {"ckpt_path": str(ckpt), "paths": {"data_dir": value, "cache_dir": cache}}
    )
    dm, _ = load_checkpoint(cfg)
    users = rng.choice(dm.data.user_ids, min(2000, meta["data"]["users"]), replace=False)
    items = rng.choice(dm.data.item_ids, min(2000, meta["data"]["items"]), replace=False)
    return [str(u) for u in users], [str(i) for i in items]


DEFAULTS = {
    "quick": False,
    "ckpt": None,
    "clients": 16,
    "seconds": 20.0,
    "workers": 2,
}


def main() -> None:
    args = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli())
    if unknown := set(args) - set(DEFAULTS):
        sys.exit(f"unknown options {sorted(unknown)}; options: {DEFAULTS}")
    if not os.environ.get("RECSYS_DATA_DIR"):
        sys.exit("set RECSYS_DATA_DIR to the folder that holds the datasets")
    if args.quick:
        args.seconds = min(args.seconds, 3.0)
    cases = QUICK if args.quick else CASES
    frames = []
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        if args.ckpt:
            ckpt = Path(args.ckpt).resolve()
            frames.append(bench_case(ckpt.name, ckpt, args, Path(tmp)))
        else:
            for name, overrides in cases.items():
                folder = Path(tmp) / name.replace(" ", "_")
                print(f"{name}: training ({' '.join(overrides)})", flush=True)
                frames.append(bench_case(name, train(overrides, folder), args, folder))
    table = pd.concat(frames, ignore_index=True)
    pd.set_option("display.width", 200)
    print(table.to_string(index=False, float_format=lambda v: f"{v:,.1f}"))


if __name__ == "__main__":
    main()
