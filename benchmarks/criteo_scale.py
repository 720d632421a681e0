"""Criteo at scale: preprocessing, streamed and in-memory training, memory and AUROC against
the number of rows of Criteo-layout click logs.

    python benchmarks/criteo_scale.py [quick=true] [rows=[1000000,10000000]]
        [memory_rows=[10000000]] [models=[dlrm,logreg]] [max_ind_range=1000000]
        [capped_rows=10000000] [cap_mb=1200] [capped_max_ind_range=20000]
        [capped_eval_batch_size=8192]
        [data_dir=<dir>] [results=benchmarks/results] [hydra overrides ...]

For each number of rows N, files in the Criteo Kaggle layout (``train.txt``) written by the
generator with a known click model (``python -m recsys.data.synthetic format=criteo``, seed
0: Criteo-like cardinalities, up to 10^7 values a feature), then, each in a fresh process:

- ``read``: the TSV reader alone (`recsys.data.clicklog.read_chunks`), rows/s;
- ``prepare``: ``data=criteo data.streaming=true``'s ``prepare_data`` on an empty cache:
  the first pass (vocabulary, capped by ``data.max_ind_range``), the second (codes) written
  as shards; rows/s, peak RSS;
- per model (``dlrm``, ``logreg``; both ``model.sparse_grad=true``: each step updates the
  batch's table rows only): one training epoch streamed from the shards, then the test split
  scored by the final weights (no validation, no checkpoint); samples/s of the epoch
  (`SamplesPerSecond`), test AUROC, peak RSS and its anonymous part;
- at the sizes in ``memory_rows``: the same DLRM epoch on the in-memory path
  (``data.streaming=false``; its ``prepare`` writes ``interactions.parquet`` first).

Then one streamed DLRM epoch at ``capped_rows`` rows in a memory cgroup of ``cap_mb`` MB
(resident memory and page cache together), smaller than the shards on disk, with
``data.max_ind_range=capped_max_ind_range`` so that the tables fit beside it, and test
batches of ``capped_eval_batch_size`` rows (DLRM's activations for criteo's 65,536-row test
batches take about 0.9 GB): it completes
or the kernel kills it. Making the cgroup needs root; elsewhere that row says why it is
missing.

Peak RSS is the kernel's (``wait4``: imports, about 0.5 GB, included); it counts the shard
pages the process maps while it reads them, which the kernel takes back when memory is
short; ``anon_mb`` (the peak of ``RssAnon``, sampled every 0.2 s) is memory only the process
holds. The oracle's AUROC on the test rows is the generator's (``oracle.json``).

Generated files go to a temporary folder, removed at the end, unless ``data_dir=<dir>``
(kept, and reused where ``oracle.json`` there has the same rows). ``quick=true``: 100K rows,
in memory too, capped run skipped (a smoke test). Results: ``<results>/criteo_scale.json``
(`recsys.bench`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from recsys import bench
from recsys.bench import Settings

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Options(Settings):
    rows: list[int] = field(default_factory=lambda: [1_000_000, 10_000_000])
    memory_rows: list[int] = field(default_factory=lambda: [10_000_000])
    models: list[str] = field(default_factory=lambda: ["dlrm", "logreg"])
    max_ind_range: int = 1_000_000
    batch_size: int = 4096
    capped_rows: int | None = 10_000_000
    cap_mb: int = 1200
    capped_max_ind_range: int = 20_000
    capped_eval_batch_size: int = 8192
    data_dir: str | None = None
    # internal: what a child process runs (read | prepare | fit) and where it writes figures
    stage: str | None = None
    report: str | None = None


QUICK = {"rows": [100_000], "memory_rows": [100_000], "capped_rows": None}
LABELS = {"dlrm": "DLRM", "logreg": "LogReg"}
# one epoch, then the test split (`fit` runs it)
FIT = [*bench.ONE_EPOCH, "model.sparse_grad=true"]


# --- the child processes ---------------------------------------------------------------------
class AnonPeak(threading.Thread):
    """The peak of this process's ``RssAnon`` (MB), sampled every ``every`` seconds."""

    def __init__(self, every: float = 0.2):
        super().__init__(daemon=True)
        self.every, self.peak_mb = every, 0.0

    def run(self) -> None:
        while True:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak_mb = max(self.peak_mb, int(line.split()[1]) / 1024)
            time.sleep(self.every)


def child(stage: str, overrides: list[str], report: Path) -> None:
    """Run one stage in this process and write its figures to ``report`` (JSON)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from recsys.callbacks import SamplesPerSecond
    from recsys.data.clicklog import read_chunks
    from recsys.train import build

    anon = AnonPeak()
    anon.start()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides)
    figures: dict = {}
    start = time.perf_counter()
    if stage == "read":
        files = instantiate(cfg.data)._files()
        figures["rows_read"] = sum(len(c) for f in files for c in read_chunks(f))
        figures["rows_per_sec"] = figures["rows_read"] / (time.perf_counter() - start)
    elif stage == "prepare":
        dm = instantiate(cfg.data)
        dm.prepare_data()
        meta = json.loads((dm.processed_dir / "meta.json").read_text())
        figures["rows_per_sec"] = meta["num_interactions"] / (time.perf_counter() - start)
        figures["table_rows"] = sum(f["num_embeddings"] for f in meta["spec"]["sparse"])
        if dm.streaming:
            figures["shards_mb"] = folder_mb(dm.shards_dir)
    elif stage == "fit":
        dm, model, trainer = build(cfg)
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        figures["fit_s"] = time.perf_counter() - start
        speed = next(c for c in trainer.callbacks if isinstance(c, SamplesPerSecond))
        figures["samples_per_sec"] = speed.overall
        (tested,) = trainer.test(model, datamodule=dm, verbose=False)
        figures["test_auroc"] = tested["test/auroc"]
        if dm.streaming:
            figures["shards_mb"] = folder_mb(dm.shards_dir)
    else:
        raise ValueError(f"stage={stage!r} is not read, prepare or fit")
    figures["anon_mb"] = anon.peak_mb
    report.write_text(json.dumps(figures))


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


# --- the parent ----------------------------------------------------------------------------
def generate(rows: int, folder: Path) -> dict:
    """Criteo-layout files of ``rows`` rows in ``folder/criteo`` (kept if already there);
    the oracle's scores, and the generator's wall time where it ran."""
    oracle = folder / "criteo" / "oracle.json"
    if oracle.is_file() and json.loads(oracle.read_text())["rows"] == rows:
        return {**json.loads(oracle.read_text()), "generate_s": None}
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "recsys.data.synthetic", "format=criteo", f"rows={rows}",
         f"out={folder}"],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return {**json.loads(oracle.read_text()), "generate_s": time.perf_counter() - start}


def run_size(rows: int, args: Options, extra: list[str], data: Path, tmp: Path) -> list[dict]:
    """Every run at ``rows`` rows: read, prepare, the models streamed, DLRM in memory."""
    oracle = generate(rows, data)
    cache = tmp / f"cache-{rows}"
    base = [
        "data=criteo",
        f"paths.data_dir={data}",
        f"paths.cache_dir={cache}",
        f"data.max_ind_range={args.max_ind_range}",
        f"data.batch_size={args.batch_size}",
        *extra,
    ]
    runs = [("read", "read", [], None), ("prepare", "prepare", ["data.streaming=true"], None)]
    runs += [
        (f"{model} streamed", "fit", ["data.streaming=true", f"model={model}", *FIT], model)
        for model in args.models
    ]
    if rows in args.memory_rows:
        runs += [
            ("prepare in memory", "prepare", ["data.streaming=false"], None),
            ("dlrm in memory", "fit", ["data.streaming=false", "model=dlrm", *FIT], "dlrm"),
        ]
    results = []
    for name, stage, overrides, model in runs:
        folder = tmp / f"{rows}-{name.replace(' ', '-')}"
        folder.mkdir()
        figures = bench.measure_stage(
            __file__, stage, [*base, f"paths.output_dir={folder}", *overrides], folder
        )
        figures |= {"rows": rows, "run": name, "model": LABELS.get(model, model)}
        figures["oracle_auroc"] = oracle["splits"]["test"]["auroc"]
        if name == "read":
            figures["generate_s"] = oracle["generate_s"]
        results.append(figures)
        print(line(figures), flush=True)
    shutil.rmtree(cache)
    return results


def run_capped(args: Options, extra: list[str], data: Path, tmp: Path) -> dict:
    """One streamed DLRM epoch in a memory cgroup of ``cap_mb``; the shards are written
    first, outside it."""
    rows = args.capped_rows
    generate(rows, data)
    base = [
        "data=criteo",
        f"paths.data_dir={data}",
        f"paths.cache_dir={tmp / 'cache-capped'}",
        f"data.max_ind_range={args.capped_max_ind_range}",
        f"data.batch_size={args.batch_size}",
        f"data.eval_batch_size={args.capped_eval_batch_size}",
        "data.streaming=true",
        *extra,
    ]
    figures = {"rows": rows, "run": f"dlrm streamed, capped at {args.cap_mb} MB", "model": "DLRM"}
    folder = tmp / "capped-prepare"
    folder.mkdir()
    bench.measure_stage(__file__, "prepare", [*base, f"paths.output_dir={folder}"], folder)
    folder = tmp / "capped-fit"
    folder.mkdir()
    try:
        figures |= bench.measure_stage(
            __file__,
            "fit",
            [*base, f"paths.output_dir={folder}", "model=dlrm", *FIT],
            folder,
            memory_cap_mb=args.cap_mb,
        )
        figures["completed"] = True
    except bench.MemoryCapError as e:
        figures |= {"completed": None, "why": str(e)}
    except RuntimeError as e:  # killed by the cgroup's limit
        figures |= {"completed": False, "why": str(e)[-500:]}
    figures["cap_mb"] = args.cap_mb
    print(line(figures), flush=True)
    return figures


def line(r: dict) -> str:
    parts = [f"{r['rows']:,} rows, {r['run']}:"]
    if "peak_mb" in r:
        parts.append(f"peak {r['peak_mb']:,.0f} MB (anon {r['anon_mb']:,.0f} MB)")
    for key, fmt in (
        ("rows_per_sec", "{:,.0f} rows/s"),
        ("samples_per_sec", "{:,.0f} samples/s"),
        ("test_auroc", "test AUROC {:.4f}"),
        ("shards_mb", "shards {:,.0f} MB"),
        ("wall_s", "{:.0f} s"),
        ("completed", "completed: {}"),
    ):
        if r.get(key) is not None:
            parts.append(fmt.format(r[key]))
    if r.get("why"):
        parts.append(f"\n{r['why']}")
    return " ".join(parts)


def table(results: list[dict]) -> str:
    lines = [
        "| rows | run | rows/s | samples/s | test AUROC | oracle | peak RSS MB | anon MB "
        "| shards MB | wall s |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def num(r: dict, key: str, fmt: str) -> str:
        return format(r[key], fmt) if r.get(key) is not None else "-"

    for r in results:
        lines.append(
            f"| {r['rows']:,} | {r['run']} | {num(r, 'rows_per_sec', ',.0f')} "
            f"| {num(r, 'samples_per_sec', ',.0f')} | {num(r, 'test_auroc', '.4f')} "
            f"| {num(r, 'oracle_auroc', '.4f')} | {num(r, 'peak_mb', ',.0f')} "
            f"| {num(r, 'anon_mb', ',.0f')} | {num(r, 'shards_mb', ',.0f')} "
            f"| {num(r, 'wall_s', '.0f')} |"
        )
    return "\n".join(lines)


FIGURES = {
    "rows_per_sec": "rows/s",
    "samples_per_sec": "samples/s",
    "test_auroc": "",
    "oracle_auroc": "",
    "peak_mb": "MB",
    "anon_mb": "MB",
    "shards_mb": "MB",
    "table_rows": "",
    "fit_s": "s",
    "wall_s": "s",
    "generate_s": "s",
    "completed": "",
}


def main(run: bench.Benchmark) -> None:
    args, extra = run.settings, run.overrides
    if args.stage is not None:
        child(args.stage, extra, Path(args.report))
        return
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="criteo-bench-") as tmp:
        tmp = Path(tmp)
        for rows in args.rows:
            data = Path(args.data_dir) / f"rows-{rows}" if args.data_dir else tmp / f"data-{rows}"
            results += run_size(rows, args, extra, data, tmp)
            if not args.data_dir and rows != args.capped_rows:
                shutil.rmtree(data)
        if args.capped_rows is not None:
            rows = args.capped_rows
            data = Path(args.data_dir) / f"rows-{rows}" if args.data_dir else tmp / f"data-{rows}"
            results.append(run_capped(args, extra, data, tmp))
    for r in results:
        for metric, unit in FIGURES.items():
            if r.get(metric) is not None:
                run.add(
                    system="recsys",
                    model=r["model"] or "data",
                    metric=metric,
                    unit=unit,
                    value=float(r[metric]),
                    settings={
                        "rows": r["rows"],
                        "run": r["run"],
                        "max_ind_range": args.capped_max_ind_range
                        if "capped" in r["run"]
                        else args.max_ind_range,
                        "batch_size": args.batch_size,
                        **({"cap_mb": r["cap_mb"]} if "cap_mb" in r else {}),
                    },
                )
    print(f"\nCriteo-layout data (generator seed 0), data.max_ind_range={args.max_ind_range}, "
          f"batch {args.batch_size}, one process per run\n")  # fmt: skip
    print(table(results))
    print(f"\nwhole command: {time.perf_counter() - start:.0f} s")
    run.write()


if __name__ == "__main__":
    main(bench.start("criteo_scale", Options, __doc__, quick=QUICK))
