"""Every benchmark of the Performance section of the README, one after the other.

    python benchmarks/suite.py [quick=true] [only=[<script>,...]]

``only`` names scripts of ``SCRIPTS`` (default: all of them, in that order).

Runs each script of this folder as its own process with this interpreter and prints its output
as it comes; the tables are the scripts' own (see each script's docstring for what it measures
and the options it takes). The full suite takes about 1 hour 40 minutes on a 2-core machine;
``quick=true`` passes ``quick=true`` to every script (small data, short runs, no RecBole: a few
minutes), so that CI runs every script end to end. Figures are only meaningful on a quiet machine.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

HERE = Path(__file__).resolve().parent
SCRIPTS = ["training", "step_cost", "ncf_table", "ranking", "scale", "table_rows", "serve"]
DEFAULTS = {"quick": False, "only": SCRIPTS}


def main() -> int:
    args = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli())
    if unknown := set(args.only) - set(SCRIPTS):
        sys.exit(f"unknown benchmarks {sorted(unknown)}; choose among {SCRIPTS}")
    failed, options = [], ["quick=true"] if args.quick else []
    for name in [s for s in SCRIPTS if s in args.only]:
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
