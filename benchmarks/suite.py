"""Every benchmark, one after the other (their figures: docs/performance.md).

    python benchmarks/suite.py [quick=true] [only=[<script>,...]] [results=<folder>]

``only`` names scripts of ``SCRIPTS`` (default: all of them, in that order).

Runs each script of this folder as its own process with this interpreter and prints its output
as it comes; the tables are the scripts' own (see each script's docstring for what it measures
and the settings it takes), and each writes its results file, ``<results>/<script>.json``
(`recsys.bench`). The full suite takes about 1 hour 40 minutes on a 2-core machine;
``quick=true`` passes ``quick=true`` to every script (small data, short runs, no RecBole: a few
minutes; results under ``logs/benchmarks/results`` unless ``results`` is given), so that CI runs
every script end to end. Figures are only meaningful on a quiet machine.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from recsys import bench
from recsys.bench import Settings

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    "training",
    "step_cost",
    "batch_building",
    "ncf_table",
    "ranking",
    "scale",
    "criteo_scale",
    "table_rows",
    "serve",
]


@dataclass
class Options(Settings):
    only: list[str] = field(default_factory=lambda: list(SCRIPTS))


def main() -> int:
    opts = bench.start("suite", Options, __doc__, overrides=False).settings  # writes no results
    if unknown := set(opts.only) - set(SCRIPTS):
        raise ValueError(f"only={opts.only}: unknown {sorted(unknown)}; choose among {SCRIPTS}")
    options = [bench.override("quick", opts.quick)]
    if opts.results is not None:
        options.append(bench.override("results", opts.results))
    failed = []
    for name in [s for s in SCRIPTS if s in opts.only]:
        command = [sys.executable, str(HERE / f"{name}.py"), *options]
        print(f"\n## {name}: {' '.join(command[1:])}\n", flush=True)
        start = time.perf_counter()
        if subprocess.run(command).returncode != 0:
            failed.append(name)
        print(f"\n({name}: {time.perf_counter() - start:.0f} s)", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
