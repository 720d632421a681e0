"""Load test of `python -m recsys.serve`: requests/s and latency per endpoint, server memory.

    python benchmarks/serve.py                  # ML-1M NeuMF and Book-Crossing DLRM
    python benchmarks/serve.py quick=true       # ML-100K NeuMF, 3 s per endpoint
    python benchmarks/serve.py ckpt=<ckpt> [clients=16] [seconds=20] [workers=2]
        [results=benchmarks/results] [hydra overrides of the cases' training]

Each case trains its model first (a short run, unless ``ckpt`` is given), starts the server
as its own process on 127.0.0.1 (a free port), and drives each endpoint with ``clients``
concurrent keep-alive clients (aiohttp, asyncio) for ``seconds``: every client sends its next
request when the last one is answered. Requests use random known ids (seeded). Printed per
endpoint: requests/s, latency p50/p95/p99 (ms, measured by the client), errors; and the
server's peak resident memory (VmHWM, all its processes). The load is bounded in time and
sent to loopback only. Results: ``<results>/serve.json`` (`recsys.bench`).
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
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import pandas as pd
import uvloop
from omegaconf import OmegaConf

from recsys import bench
from recsys.bench import Settings
from recsys.runs import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # name: training overrides
    "ml-1m NeuMF": ["experiment=ml1m_neumf", "trainer.max_epochs=3"],
    "Book-Crossing DLRM": ["data=books", "model=dlrm", "trainer.max_epochs=1"],
}
QUICK_CASES = {"ml-100k NeuMF": ["data=movielens", "data.variant=100k", "trainer.max_epochs=1"]}


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


def start_server(ckpt: Path, port: int, args: Options, folder: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "recsys.serve", f"ckpt_path={ckpt}", f"serve.port={port}"]
    cmd += [f"serve.workers={args.workers}", f"hydra.run.dir={folder}"]
    server = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    log = folder / "serve.log"  # Hydra's job log: "ready: ..." once every worker accepts
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}: {' '.join(cmd)}")
        if log.is_file() and "ready: serving" in log.read_text():
            return server
        time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"the server did not log 'ready: serving' in {log} within 300 s")


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


def bench_case(name: str, ckpt: Path, args: Options, folder: Path) -> pd.DataFrame:
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


@dataclass
class Options(Settings):
    ckpt: str | None = None  # a checkpoint to serve instead of training the cases
    clients: int = 16
    seconds: float = 20.0  # per endpoint
    workers: int = 2


QUICK = {"seconds": 3.0}
FIGURES = {  # the columns of bench_case's frame that become rows, and their units
    "requests/s": ("requests_per_sec", "requests/s"),
    "p50 ms": ("p50_ms", "ms"),
    "p95 ms": ("p95_ms", "ms"),
    "p99 ms": ("p99_ms", "ms"),
    "requests": ("requests", ""),
    "errors": ("errors", ""),
}


def add_rows(run: bench.Benchmark, table: pd.DataFrame) -> None:
    args = run.settings
    where = {"clients": args.clients, "seconds": args.seconds, "workers": args.workers}
    for r in table.to_dict("records"):
        for column, (metric, unit) in FIGURES.items():
            run.add(
                system="recsys.serve",
                model=r["case"],
                metric=metric,
                unit=unit,
                value=r[column],
                settings={**where, "endpoint": r["endpoint"]},
            )
    for case, memory in table.groupby("case", sort=False)["server peak MB"].first().items():
        run.add(
            system="recsys.serve",
            model=case,
            metric="server_peak_mb",
            unit="MB",
            value=memory,
            settings=where,
        )


def main(run: bench.Benchmark) -> None:
    args = run.settings
    if not os.environ.get("RECSYS_DATA_DIR"):
        raise ValueError("set RECSYS_DATA_DIR to the folder that holds the datasets")
    cases = QUICK_CASES if args.quick else CASES
    frames = []
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        if args.ckpt:
            ckpt = Path(args.ckpt).resolve()
            frames.append(bench_case(ckpt.name, ckpt, args, Path(tmp)))
        else:
            for name, overrides in cases.items():
                folder = Path(tmp) / name.replace(" ", "_")
                overrides = [*overrides, *run.overrides]
                print(f"{name}: training ({' '.join(overrides)})", flush=True)
                frames.append(bench_case(name, train(overrides, folder), args, folder))
    table = pd.concat(frames, ignore_index=True)
    add_rows(run, table)
    pd.set_option("display.width", 200)
    print(table.to_string(index=False, float_format=lambda v: f"{v:,.1f}"))
    run.write()


if __name__ == "__main__":
    main(bench.start("serve", Options, __doc__, quick=QUICK))
