"""Load test of `python -m recsys.serve`: requests/s and latency per endpoint, server memory.

    python benchmarks/serve.py                  # the cases below, 16 and 64 clients
    python benchmarks/serve.py quick=true       # small versions of them, 3 s per endpoint
    python benchmarks/serve.py bad=[0.0]        # no bad requests (default: none, then 10%)
    python benchmarks/serve.py ckpt=<ckpt> [clients=[16,64]] [seconds=20] [workers=2]
        [results=benchmarks/results] [hydra overrides of the cases' training]

Cases (`CASES`): ML-1M NeuMF exact and with an ANN index (``serve.retrieval=ann``); a
synthetic catalogue of 1M items under a matrix factorisation trained 2 epochs on 20M
interactions of the synthetic generator, exact and ANN; Book-Crossing DLRM scoring every item
and two-stage (``serve.candidates=``: a GMF of the same data proposes 100 or 1,000 items).

Each case trains its models first (short runs, unless ``ckpt`` is given), then per variant
measures the retrieval recall@10 against exhaustive scoring in this process (which also
builds the variant's index, saved beside the checkpoint for the server to load), starts the
server as its own process on 127.0.0.1 (a free port), and drives each endpoint with each
number of ``clients`` concurrent keep-alive clients (aiohttp, asyncio) for ``seconds``: every
client sends its next request when the last one is answered. Requests use random known ids
(seeded); with ``bad`` that share of them is malformed or names an unknown user, and an
answer other than its 4xx counts as an error. Printed per endpoint: requests/s, latency
p50/p95/p99 (ms, measured by the client, over every request), errors; and the server's peak
resident memory (VmHWM, all its processes). The load client runs on the same machine as the
server and shares its cores. The load is bounded in time and sent to loopback only. Results:
``<results>/serve.json`` (`recsys.bench`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import pandas as pd
import torch
import uvloop
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from recsys import bench
from recsys.bench import Settings
from recsys.recommender import Recommender
from recsys.retrieval import retrieval_recall
from recsys.runs import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    """A model to train (``train``: overrides of train.py) and the ways to serve it
    (``variants``: name -> serve overrides; ``{candidates}`` stands for the checkpoint of a
    second model trained with ``candidates``, on the same data)."""

    train: list[str]
    variants: dict[str, list[str]]
    candidates: list[str] | None = None


EXACT_ANN = {"exact": [], "ann": ["serve.retrieval=ann"]}
TWO_STAGE = {
    "exact": [],
    "two-stage": ["serve.candidates={candidates}"],
    "two-stage 1,000 candidates": ["serve.candidates={candidates}", "serve.num_candidates=1000"],
}
# a matrix factorisation of the synthetic generator's log, items drawn uniformly so that
# every item of the catalogue is trained; row-sparse Adam, as large tables want
SYNTHETIC_MF = ["data=synthetic", "model=mf", "trainer.max_epochs=2", "data.item_exponent=0.0"]
SYNTHETIC_MF += ["data.split.val=0.01", "data.split.test=0.01", "data.batch_size=16384"]
SYNTHETIC_MF += ["callbacks.early_stopping=null", "model.sparse_grad=true"]
SYNTHETIC_MF += [
    "model.sparse_optimizer={_target_: recsys.lit.optim.RowSparseAdam, _partial_: true, lr: 0.01}"
]
BOOKS = ["data=books", "trainer.max_epochs=1"]
CASES = {
    "ml-1m NeuMF": Case(["experiment=ml1m_neumf", "trainer.max_epochs=3"], EXACT_ANN),
    "synthetic 1M items MF": Case(
        [*SYNTHETIC_MF, "data.num_items=1000000", "data.num_users=20000", "data.num_rows=20000000"],
        EXACT_ANN,
    ),
    "Book-Crossing DLRM": Case(
        [*BOOKS, "model=dlrm"], TWO_STAGE, candidates=[*BOOKS, "model.variant=gmf"]
    ),
}
ML100K = ["data=movielens", "data.variant=100k", "trainer.max_epochs=1"]
QUICK_CASES = {
    "ml-100k NeuMF": Case(ML100K, EXACT_ANN),
    "synthetic 20K items MF": Case(
        [*SYNTHETIC_MF, "data.num_items=20000", "data.num_users=2000", "data.num_rows=400000"],
        EXACT_ANN,
    ),
    "ml-100k DLRM": Case(
        [*ML100K, "model=dlrm"], TWO_STAGE, candidates=[*ML100K, "model.variant=gmf"]
    ),
}
# endpoints every variant is driven on; the exact variant is driven on every endpoint
RETRIEVAL_ENDPOINTS = ("GET /recommend k=10", "POST /recommend 8 users k=10")


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


def start_server(
    ckpt: Path, port: int, args: Options, folder: Path, serve: list[str]
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "recsys.serve", f"ckpt_path={ckpt}", f"serve.port={port}"]
    cmd += [f"serve.workers={args.workers}", f"hydra.run.dir={folder}", *serve]
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
    """``clients`` concurrent loops sending ``make_request(rng)`` -> (method, path, json,
    bad) for ``seconds``; returns requests/s, latency percentiles and the number of errors:
    answers other than 200 to a good request, other than 4xx to a bad one (``bad``), and
    connections the server closed under a request.

    The client is aiohttp: it shares the machine's cores with the server, and costs about a
    tenth of the CPU per request that an httpx client does."""
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base, connector=connector) as session:

        async def send(rng: random.Random) -> bool:
            method, path, body, bad = make_request(rng)
            try:
                async with session.request(method, path, json=body) as response:
                    await response.read()
                    return 400 <= response.status < 500 if bad else response.status == 200
            except aiohttp.ClientConnectionError:  # closed by the server under the request
                return False

        warm = random.Random(seed)
        await asyncio.gather(*(send(warm) for _ in range(2 * clients)))  # connections open
        stop = time.perf_counter() + seconds

        async def loop(i: int) -> None:
            nonlocal errors
            rng = random.Random(seed * 1000 + i)
            while time.perf_counter() < stop:
                t = time.perf_counter()
                ok = await send(rng)
                latencies.append(time.perf_counter() - t)
                errors += not ok

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


BAD_REQUESTS = {  # per endpoint: a request the service must refuse with a 4xx
    "GET": lambda r: ("GET", r.choice(["/recommend?user_id=no-such-user", "/recommend?k=0"]), None),
    "POST": lambda r: ("POST", "/recommend", r.choice([{"user_ids": []}, {"k": 10}])),
}


def with_bad(make_request, share: float):
    """``make_request`` with the flag ``bad``; a ``share`` of the requests replaced by bad
    ones of the same method."""

    def make(r: random.Random):
        method, path, body = make_request(r)
        if share and r.random() < share:
            return (*BAD_REQUESTS[method](r), True)
        return method, path, body, False

    return make


def bench_case(
    name: str, variant: str, ckpt: Path, serve: list[str], args: Options, folder: Path
) -> pd.DataFrame:
    port = free_port()
    run_dir = folder / f"serve-{re.sub(r'[^A-Za-z0-9_-]+', '_', variant)}"  # a Hydra override
    server = start_server(ckpt, port, args, run_dir, serve)
    try:
        base = f"http://127.0.0.1:{port}"
        meta = httpx.get(f"{base}/metadata").json()
        # known ids: the dataset's raw ids, read back from the server's own answers
        rng = np.random.default_rng(0)
        users, items = sample_ids(ckpt, meta, rng)
        rows = []
        for endpoint, make in endpoints(users, items).items():
            if variant != "exact" and endpoint not in RETRIEVAL_ENDPOINTS:
                continue
            for share, clients in itertools.product(args.bad, args.clients):
                # uvloop (as the server runs): the client shares the cores with the server
                load = drive(base, with_bad(make, share), clients, args.seconds, seed=1)
                figures = uvloop.run(load)
                about = {"endpoint": endpoint, "clients": clients, "bad": share}
                rows.append({"case": name, "variant": variant, **about} | figures)
                print(
                    f"  {variant} {endpoint}, {clients} clients, {share:.0%} bad: "
                    f"{figures['requests/s']:.0f} req/s, p99 {figures['p99 ms']:.1f} ms",
                    flush=True,
                )
        memory = peak_rss_mb(server.pid)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    frame = pd.DataFrame(rows)
    frame["server peak MB"] = memory
    print(
        f"{name} ({variant}): {meta['data']['users']:,} users, {meta['data']['items']:,} "
        f"items, {args.workers} worker(s), retrieval {meta.get('retrieval')}"
    )
    return frame


def serve_config(ckpt: Path, serve: list[str]):
    """conf/serve.yaml for ``ckpt`` with the ``serve`` overrides, as the server composes it."""
    paths = [f"paths.data_dir={os.environ['RECSYS_DATA_DIR']}"]
    paths.append(f"paths.cache_dir={os.environ.get('RECSYS_CACHE_DIR', str(ROOT / 'cache'))}")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("serve", overrides=[f"ckpt_path={ckpt}", *paths, *serve])


def recall(ckpt: Path, serve: list[str], users: int, k: int = 10) -> float:
    """recall@k of the variant's top-k (unseen items) against scoring every item, over
    ``users`` users drawn at random (seed 0). Loading the variant builds its index and saves
    it beside the checkpoint, where the server's workers find it."""
    variant = Recommender.from_config(serve_config(ckpt, serve), "serve")
    exact = Recommender.from_config(serve_config(ckpt, []), "serve")
    chosen = torch.randperm(exact.num_users, generator=torch.Generator().manual_seed(0))
    chosen = chosen[:users]
    return retrieval_recall(variant.retriever, exact.scorer, chosen, k, exact.seen)


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
    clients: list[int] = field(default_factory=lambda: [16, 64])  # each, per endpoint
    seconds: float = 20.0  # per endpoint and number of clients
    workers: int = 2
    # shares of bad requests (unknown users, malformed bodies: 4xx expected), each measured
    bad: list[float] = field(default_factory=lambda: [0.0, 0.1])
    recall_users: int = 1000  # users the recall@10 against exhaustive scoring is measured on


QUICK = {"seconds": 3.0, "clients": [16], "bad": [0.1], "recall_users": 100}
FIGURES = {  # the columns of bench_case's frame that become rows, and their units
    "requests/s": ("requests_per_sec", "requests/s"),
    "p50 ms": ("p50_ms", "ms"),
    "p95 ms": ("p95_ms", "ms"),
    "p99 ms": ("p99_ms", "ms"),
    "requests": ("requests", ""),
    "errors": ("errors", ""),
}


def add_rows(run: bench.Benchmark, table: pd.DataFrame, recalls: dict) -> None:
    args = run.settings
    where = {"seconds": args.seconds, "workers": args.workers}
    for r in table.to_dict("records"):
        for column, (metric, unit) in FIGURES.items():
            run.add(
                system="recsys.serve",
                model=r["case"],
                metric=metric,
                unit=unit,
                value=r[column],
                settings={
                    **where,
                    "retrieval": r["variant"],
                    "endpoint": r["endpoint"],
                    "clients": r["clients"],
                    "bad": r["bad"],
                },
            )
    memory = table.groupby(["case", "variant"], sort=False)["server peak MB"].first()
    for (case, variant), mb in memory.items():
        run.add(
            system="recsys.serve",
            model=case,
            metric="server_peak_mb",
            unit="MB",
            value=mb,
            settings={**where, "retrieval": variant},
        )
    for (case, variant), value in recalls.items():
        run.add(
            system="recsys.serve",
            model=case,
            metric="recall_at_10",
            unit="",
            value=value,
            settings={"retrieval": variant, "users": args.recall_users},
        )


def main(run: bench.Benchmark) -> None:
    args = run.settings
    if not os.environ.get("RECSYS_DATA_DIR"):
        raise ValueError("set RECSYS_DATA_DIR to the folder that holds the datasets")
    cases = QUICK_CASES if args.quick else CASES
    frames, recalls = [], {}
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        if args.ckpt:
            ckpt = Path(args.ckpt).resolve()
            frames.append(bench_case(ckpt.name, "exact", ckpt, [], args, Path(tmp)))
        else:
            for name, case in cases.items():
                folder = Path(tmp) / name.replace(" ", "_")
                overrides = [*case.train, *run.overrides]
                print(f"{name}: training ({' '.join(overrides)})", flush=True)
                ckpt = train(overrides, folder)
                candidates = None
                if case.candidates is not None:
                    print(f"{name}: training the candidate model", flush=True)
                    candidates = train([*case.candidates, *run.overrides], folder / "candidates")
                for variant, serve in case.variants.items():
                    serve = [o.format(candidates=candidates) for o in serve]
                    if variant != "exact":
                        recalls[name, variant] = recall(ckpt, serve, args.recall_users)
                        print(f"  {variant}: recall@10 {recalls[name, variant]:.3f}", flush=True)
                    frames.append(bench_case(name, variant, ckpt, serve, args, folder))
    table = pd.concat(frames, ignore_index=True)
    add_rows(run, table, recalls)
    pd.set_option("display.width", 200)
    print(table.to_string(index=False, float_format=lambda v: f"{v:,.1f}"))
    run.write()


if __name__ == "__main__":
    main(bench.start("serve", Options, __doc__, quick=QUICK))
