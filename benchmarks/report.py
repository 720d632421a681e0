"""The docs' performance page and the README's headline table, written from the results files.

    python benchmarks/report.py [check=true] [results=benchmarks/results]

Reads every ``<results>/*.json`` (`recsys.bench`) and writes ``docs/performance.md``: per
file, the command, commit, machine and library versions that produced it, and its rows as a
table (one line per system, model and setting that differs; one column per metric). The
README's table between ``<!-- results:begin -->`` and ``<!-- results:end -->`` is rewritten
from the same files. ``check=true`` writes nothing and exits 1 when either file is not what
the results give (the test suite runs it), so no figure in them can drift from its file.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from recsys import bench
from recsys.bench import Settings

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "performance.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
# the order of the page's sections; files not named here follow in name order
ORDER = ("training", "ncf_table", "ncf_table_seeds", "criteo_scale")
TITLES = {
    "training": "Training throughput: the platform against a bare loop",
    "ncf_table": "The NCF paper's table (leave-one-out, 99 sampled negatives)",
    "ncf_table_seeds": "The NCF table over seeds",
    "criteo_scale": "Criteo-layout click logs: streamed and in memory",
    "batch_building": "Batch building alone",
    "step_cost": "The framework's cost per step",
    "ranking": "Full-catalogue ranking",
    "scale": "Training at 1M-50M rows",
    "table_rows": "NeuMF's step against table size",
    "serve": "Serving under load",
}
# what a section's figures are, said beside them
NOTES = {
    "serve": "The load client (closed-loop keep-alive clients, aiohttp) runs on the same "
    "machine as the server and shares its cores: each figure is the server and its client "
    "together. Percentiles are over every request, bad ones and errors included; recall@10 "
    "is against scoring every item.",
}


@dataclass
class Options(Settings):
    check: bool = False


def load(results: Path) -> dict[str, dict]:
    """``{name: results document}`` of the folder, in the page's order."""
    docs = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}
    order = [n for n in ORDER if n in docs] + sorted(n for n in docs if n not in ORDER)
    return {n: docs[n] for n in order}


def number(value) -> str:
    """A figure as the page prints it: integers with thousands separators, others to four
    significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, bool | str):
        return str(value)
    if float(value).is_integer() and abs(value) >= 1:
        return f"{int(value):,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def provenance(doc: dict) -> str:
    """Where a file's figures come from: command, commit, date, machine, versions."""
    env = doc["env"]
    sha = (env.get("git_sha") or "unknown")[:10]
    dirty = " with uncommitted changes" if env.get("git_dirty") else ""
    device = env.get("device_name") or env.get("device")
    versions = ", ".join(
        f"{k} {env[k]}" for k in ("python", "torch", "lightning", "torchrec") if env.get(k)
    )
    cuda = f", CUDA {env['cuda']}" if env.get("cuda") else ""
    return (
        f"`{doc['command']}` at commit `{sha}`{dirty}, {doc['started'][:10]}, "
        f"{number(doc.get('seconds'))} s; {device} ({env.get('cpus')} CPUs, "
        f"{env.get('threads')} threads{cuda}); {versions}."
    )


def table(rows: list[dict]) -> str:
    """The rows as one Markdown table: a line per (system, model, settings that differ among
    the rows), a column per metric (with its unit). A setting that only a few rows have (a
    ratio's ``baseline``) qualifies their metric's column instead."""
    shared = _common(rows)
    varying = sorted(k for k in shared if len({_key(r["settings"].get(k)) for r in rows}) > 1)
    columns: dict[str, None] = {}
    lines: dict[tuple, dict[str, str]] = {}
    for r in rows:
        extra = {k: v for k, v in r["settings"].items() if k not in shared}
        if r.get("statistic") not in (None, "median"):
            extra["statistic"] = r["statistic"]
        column = r["metric"] + (f" ({r['unit']})" if r.get("unit") else "")
        if extra:
            column += " [" + ", ".join(f"{k}={_cell(v)}" for k, v in extra.items()) + "]"
        columns.setdefault(column)
        key = (r["system"], r["model"], *(_cell(r["settings"].get(k)) for k in varying))
        lines.setdefault(key, {})[column] = number(r["value"])
    header = ["system", "model", *varying, *columns]
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for key, values in lines.items():
        out.append("| " + " | ".join([*key, *(values.get(c, "") for c in columns)]) + " |")
    return "\n".join(out)


def _common(rows: list[dict]) -> set[str]:
    """The settings that more than half the rows have: a table's columns."""
    counts = Counter(k for r in rows for k in r["settings"])
    return {k for k, n in counts.items() if 2 * n > len(rows)}


def _key(value) -> str:
    return json.dumps(value, sort_keys=True)


def _cell(value) -> str:
    return "" if value is None else number(value) if isinstance(value, int | float) else str(value)


def constant_settings(rows: list[dict]) -> str:
    """The settings every row has with the same value, as ``k=v, ...``."""
    shared = _common(rows)
    same = sorted(k for k in shared if len({_key(r["settings"].get(k)) for r in rows}) == 1)
    return ", ".join(f"{k}={_cell(rows[0]['settings'][k])}" for k in same)


def page(docs: dict[str, dict]) -> str:
    parts = [
        "# Performance",
        "",
        "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; do not "
        "edit by hand. Each section names the command, commit and machine of its figures. "
        "Medians where a figure was measured several times (the runs are in the file). "
        "How the benchmarks are written and what was tried: [method notes](method-notes.md).",
    ]
    for name, doc in docs.items():
        same = constant_settings(doc["rows"])
        parts += [
            "",
            f"## {TITLES.get(name, name)}",
            "",
            f"From `benchmarks/results/{name}.json`: {provenance(doc)}",
            "",
            *([NOTES[name], ""] if name in NOTES else []),
            *([f"Every row: {same}.", ""] if same else []),
            table(doc["rows"]),
        ]
    return "\n".join(parts) + "\n"


def _value(doc: dict, **where) -> float | None:
    row = bench.find(doc["rows"], **where)
    return None if row is None else row["value"]


def headline(docs: dict[str, dict]) -> str:
    """The README's table: a few figures, each with the file and commit it comes from."""
    lines = ["| figure | value | source |", "| --- | --- | --- |"]

    def add(what: str, value, name: str) -> None:
        if value is not None:
            sha = docs[name]["env"]["git_sha"][:7]
            lines.append(f"| {what} | {value} | `{name}.json` at `{sha}` |")

    if (doc := docs.get("training")) is not None:
        for batch in sorted(
            {r["settings"]["batch"] for r in doc["rows"] if "batch" in r["settings"]}
        ):
            ratio = _value(doc, system="recsys", metric="samples_per_sec_ratio", batch=batch)
            rate = _value(doc, system="recsys", metric="samples_per_sec", batch=batch)
            if ratio is not None and rate is not None:
                add(
                    f"NeuMF training on CPU, batch {batch:,}: samples/s (x bare loop)",
                    f"{number(rate)} ({ratio:.2f}x)",
                    "training",
                )
    if (doc := docs.get("ncf_table")) is not None:
        for model in (
            "NeuMF",
            "MF (Rendle et al. 2020)",
            "EASE (Steck 2019)",
            "ItemKNN",
            "popularity",
        ):
            hr = _value(doc, model=model, metric="test/hr@10")
            ndcg = _value(doc, model=model, metric="test/ndcg@10")
            p = _value(doc, model=model, metric="p_vs_neumf/test/hr@10")
            if hr is not None:
                against = "" if p is None else f" (p = {p:.2g} against NeuMF)"
                add(
                    f"ml-1m leave-one-out, {model}: HR@10 / NDCG@10",
                    f"{hr:.4f} / {ndcg:.4f}{against}",
                    "ncf_table",
                )
    if (doc := docs.get("serve")) is not None:
        for case, retrieval in (
            ("ml-1m NeuMF", "exact"),
            ("synthetic 1M items MF", "exact"),
            ("synthetic 1M items MF", "ann"),
            ("Book-Crossing DLRM", "exact"),
            ("Book-Crossing DLRM", "two-stage"),
            ("Book-Crossing DLRM", "two-stage 1,000 candidates"),
        ):
            where = {"model": case, "retrieval": retrieval, "endpoint": "GET /recommend k=10"}
            where.update(clients=16, bad=0.0)
            rate = _value(doc, metric="requests_per_sec", **where)
            p99 = _value(doc, metric="p99_ms", **where)
            recall = _value(doc, model=case, metric="recall_at_10", retrieval=retrieval)
            if rate is not None and p99 is not None:
                also = "" if recall is None else f", recall@10 {recall:.3f}"
                add(
                    f"Serving {case} ({retrieval}), GET /recommend, 2 workers, 16 clients: "
                    "requests/s (p99)",
                    f"{number(rate)} ({p99:.0f} ms{also})",
                    "serve",
                )
    if (doc := docs.get("criteo_scale")) is not None:
        for row in doc["rows"]:
            s = row["settings"]
            if row["model"] == "DLRM" and row["metric"] == "test_auroc" and "cap_mb" not in s:
                oracle = _value(
                    doc, model="DLRM", metric="oracle_auroc", run=s["run"], rows=s["rows"]
                )
                add(
                    f"Criteo layout, {s['rows']:,} rows, DLRM {s['run'].removeprefix('dlrm ')}: "
                    "test AUROC (the generator's oracle)",
                    f"{row['value']:.4f} ({number(oracle)})",
                    "criteo_scale",
                )
    return "\n".join(lines)


def with_headline(readme: str, docs: dict[str, dict]) -> str:
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return f"{readme[:start]}\n{headline(docs)}\n{readme[end:]}"


def main() -> int:
    opts = bench.start("report", Options, __doc__, overrides=False).settings  # writes no results
    docs = load(Path(opts.results) if opts.results else bench.RESULTS)
    wanted = {PAGE: page(docs), README: with_headline(README.read_text(), docs)}
    stale = [p for p, text in wanted.items() if not p.exists() or p.read_text() != text]
    if opts.check:
        for path in stale:
            print(
                f"{path.relative_to(ROOT)} is not what the results give: run "
                "python benchmarks/report.py",
                file=sys.stderr,
            )
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
