"""The README and the docs' performance page hold the figures of `benchmarks/results/` and
nothing else: `benchmarks/report.py` writes them, and its check fails when they drift."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = [sys.executable, str(ROOT / "benchmarks" / "report.py")]


def test_the_performance_page_and_the_readme_table_are_the_results_files():
    done = subprocess.run([*REPORT, "check=true"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_a_figure_that_differs_from_its_file_is_caught(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    path = results / "training.json"
    doc = json.loads(path.read_text())
    row = next(r for r in doc["rows"] if r["metric"] == "samples_per_sec_ratio")
    row["value"] += 0.5
    path.write_text(json.dumps(doc))
    done = subprocess.run(
        [*REPORT, "check=true", f"results={results}"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 1
    assert "docs/performance.md" in done.stderr and "README.md" in done.stderr


def test_the_readme_is_a_short_users_document():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
