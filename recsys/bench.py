"""The benchmarks' harness: settings from the command line, alternating rounds, the machine and
code a figure was measured on, and the results file every script in ``benchmarks/`` writes.

A script declares its settings as a dataclass deriving from `Settings` and goes through
`start`::

    @dataclass
    class Options(Settings):
        batches: list[int] = field(default_factory=lambda: [1280, 4096])

    bench = start("training", Options, __doc__, quick={"batches": [1280]})
    for batch in bench.settings.batches:
        ...
        bench.add(system="recsys", model="NeuMF", metric="samples_per_sec", unit="samples/s",
                  value=v, settings={"batch": batch}, runs=[...], statistic="median")
    bench.write()

Scripts that compare systems measure them in `alternating_rounds` and compare within rounds
(`paired`); a script that runs itself in fresh processes reads their results back with
`run_child` (arguments written by `override`); `find` picks a row, e.g. to print a table from
the rows that the file holds.

Command line, in Hydra's override grammar (as ``train.py`` takes it)::

    python benchmarks/<name>.py [setting=value ...] [hydra override ...] [--help]

An argument whose key is a field of the script's settings sets it, typed by the dataclass
(``batches=[1280,4096]``, ``quick=true``, ``results=/tmp/r``; a value of the wrong type is an
error naming the setting). Every other argument is a Hydra override of the platform's config
(``conf/train.yaml``), kept as typed and given to every run the script composes; a script that
composes none refuses them. ``quick=true`` applies the script's quick settings first, and the
command line's settings still win over them.

Results file ``<results>/<name>.json``, written once at the end, atomically (a reader sees the
previous file or the new one). ``results`` defaults to ``benchmarks/results`` of this checkout;
with ``quick=true`` to ``logs/benchmarks/results`` under the working directory, so that smoke
tests never replace published figures. The file (``schema`` 1)::

    {
      "schema": 1,
      "name": "training",                      # the file's stem
      "command": "python benchmarks/training.py repeats=5",
      "settings": {"quick": false, ...},       # every setting of the script, after parsing
      "overrides": ["data.num_workers=1"],     # the Hydra overrides given to its runs
      "started": "2026-11-28T09:00:00+00:00",  # UTC
      "seconds": 912.4,                        # the whole command's wall time
      "env": {
        "git_sha": "9735cbf...", "git_dirty": false,   # null where not a git checkout
        "cpu": "AMD EPYC 7B13", "cpus": 2, "threads": 2,
        "device": "cpu", "device_name": "AMD EPYC 7B13",  # "cuda" and the GPU's name on one
        "python": "3.12.3", "torch": "2.13.0", "cuda": null,
        "lightning": "2.6.6", "torchrec": "1.8.0"
      },
      "rows": [
        {"system": "recsys", "model": "NeuMF", "metric": "samples_per_sec",
         "unit": "samples/s", "value": 97533.0,
         "settings": {"batch": 1280, "threads": 2, "device": "cpu"},
         "statistic": "median", "runs": [95702.0, 97533.0, 99012.0]}
      ]
    }

One row per measured figure. Every row has ``system`` (what ran: ``recsys``, ``bare``,
``RecBole 1.2.1``, a mode or an endpoint), ``model``, ``metric`` (a name, e.g.
``samples_per_sec``, ``test/hr@10``, ``step_ms``), ``unit`` (``""`` for a plain number),
``value`` (a number, or null for a figure that was never reached) and ``settings`` (what
distinguishes the row from the file's other rows of the same system, model and metric: batch
size, seed, baseline of a ratio ...). A figure summarised from several runs adds
``statistic`` (``median``, ``mean``) and ``runs``, the values it summarises in the order they
were measured (each round's, each seed's). ``git_dirty`` leaves ``benchmarks/results/`` out,
which the benchmarks themselves write; ``threads`` is torch's intra-op threads when the
file is written.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import numbers
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Quote, QuotedString
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

SCHEMA = 1
REPO = Path(__file__).resolve().parents[1]

# train.py overrides for one training epoch and nothing else: no validation, checkpoint,
# logger or progress bar
ONE_EPOCH = (
    "trainer.max_epochs=1",
    "+trainer.limit_val_batches=0",
    "+trainer.enable_checkpointing=false",
    "+trainer.enable_progress_bar=false",
    "callbacks.model_checkpoint=null",
    "callbacks.last_checkpoint=null",
    "callbacks.early_stopping=null",
    "callbacks.progress_bar=null",
    "logger=none",
)

RESULTS = REPO / "benchmarks" / "results"
QUICK_RESULTS = Path("logs/benchmarks/results")
ROW_KEYS = ("system", "model", "metric", "unit", "value", "settings")
S = TypeVar("S", bound="Settings")
T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


@dataclasses.dataclass
class Settings:
    """What every benchmark takes: ``quick`` (small data, short runs: a smoke test) and
    ``results`` (the folder of its results file; None: see the module's docstring)."""

    quick: bool = False
    results: str | None = None


def parse(
    cls: type[S], argv: Sequence[str], quick: dict | None = None, overrides: bool = True
) -> tuple[S, list[str]]:
    """The settings of ``cls`` that ``argv`` gives (``quick`` first where ``quick=true``), and
    the other arguments, the Hydra overrides, as typed. ``overrides=False``: a script that
    composes no config; any other argument is an error."""
    parser = OverridesParser.create()
    fields = {f.name for f in dataclasses.fields(cls)}
    ours: dict[str, Any] = {}
    rest: list[str] = []
    for arg in argv:
        try:
            override = parser.parse_override(arg)
        except HydraException as e:  # the grammar's errors
            raise ValueError(f"{arg!r} is not a key=value override: {e}") from None
        key = override.key_or_group
        if key in fields and override.is_sweep_override():
            raise ValueError(f"{arg}: a setting takes one value, not a sweep")
        if key in fields and not (override.is_add() or override.is_delete()):
            ours[key] = override.value()
        elif overrides:
            rest.append(arg)
        else:
            raise ValueError(
                f"{arg}: not a setting of this benchmark, and it composes no config that "
                f"Hydra overrides would go to; settings: {sorted(fields)}"
            )
    merged = OmegaConf.structured(cls)
    try:
        if ours.get("quick", merged.quick) and quick:
            merged = OmegaConf.merge(merged, quick)
        merged = OmegaConf.merge(merged, ours)
    except OmegaConfBaseException as e:
        raise ValueError(f"bad setting: {e}") from None
    return OmegaConf.to_object(merged), rest


class Benchmark:
    """One benchmark run: its settings and Hydra overrides, the rows it measured, and its
    results file (`write`)."""

    def __init__(self, name: str, settings: Settings, overrides: Sequence[str] = ()) -> None:
        self.name = name
        self.settings = settings
        self.overrides = list(overrides)
        self.rows: list[dict] = []
        self._started = datetime.datetime.now(datetime.timezone.utc)
        self._clock = time.perf_counter()
        self._git = git_state()  # before the run writes anything

    @property
    def folder(self) -> Path:
        if self.settings.results is not None:
            return Path(self.settings.results)
        return QUICK_RESULTS if self.settings.quick else RESULTS

    def add(
        self,
        *,
        system: str,
        model: str,
        metric: str,
        unit: str,
        value: float | int | None,
        settings: dict | None = None,
        statistic: str | None = None,
        runs: Iterable[float] | None = None,
    ) -> dict:
        """Appends one row (see the module's docstring) and returns it."""
        if (statistic is None) != (runs is None):
            raise ValueError(f"{metric} of {system}: give statistic and runs together")
        row = {
            "system": system,
            "model": model,
            "metric": metric,
            "unit": unit,
            "value": _number(value),
            "settings": _plain(settings or {}),
        }
        if runs is not None:
            row["statistic"] = statistic
            row["runs"] = [_number(v) for v in runs]
        self.rows.append(row)
        return row

    def add_paired(
        self,
        values: Sequence[float],
        baseline: Sequence[float],
        op: Callable[[float, float], float],
        *,
        settings: dict,
        **row: Any,
    ) -> dict:
        """Appends the median over rounds of ``op(value, baseline value)`` (a ratio, a
        difference: `paired`), with every round's figure as its runs."""
        runs = paired(values, baseline, op)
        return self.add(value=median(runs), settings=settings, statistic="median", runs=runs, **row)

    def document(self) -> dict:
        return {
            "schema": SCHEMA,
            "name": self.name,
            "command": shlex.join(["python", _script(), *sys.argv[1:]]),
            "settings": _plain(dataclasses.asdict(self.settings)),
            "overrides": self.overrides,
            "started": self._started.isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - self._clock, 1),
            "env": environment(self._git),
            "rows": self.rows,
        }

    def write(self) -> Path:
        """Writes ``<results>/<name>.json`` atomically; returns its path."""
        path = self.folder / f"{self.name}.json"
        write_json(path, self.document())
        print(f"\nresults: {path}", flush=True)
        return path


def start(
    name: str,
    cls: type[Settings],
    doc: str | None,
    quick: dict | None = None,
    overrides: bool = True,
    argv: Sequence[str] | None = None,
) -> Benchmark:
    """The `Benchmark` of a script's command line (``sys.argv[1:]``; see `parse`).
    ``-h``/``--help`` prints ``doc`` and the settings' defaults, and exits."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        defaults = OmegaConf.to_yaml(OmegaConf.structured(cls))
        sys.exit(f"{doc or ''}\nSettings (defaults):\n\n{defaults}")
    settings, rest = parse(cls, argv, quick, overrides)
    return Benchmark(name, settings, rest)


def find(rows: Iterable[dict], /, **where: Any) -> dict | None:
    """The first row whose fields (``system``, ``metric`` ...) or, for other keys, whose
    ``settings`` hold the values of ``where``; None when none does."""
    for row in rows:
        if all(_field(row, k) == v for k, v in where.items()):
            return row
    return None


def _field(row: dict, key: str) -> Any:
    return row.get(key) if key in ROW_KEYS else row["settings"].get(key)


def override(key: str, value: Any) -> str:
    """``key=value`` in Hydra's grammar, for `parse` to read back as ``value`` (strings
    quoted, so that paths and labels with spaces, commas or brackets survive)."""
    return f"{key}={_literal(value)}"


def _literal(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return QuotedString(text=str(value), quote=Quote.single).with_quotes()
    if isinstance(value, list | tuple):
        return f"[{','.join(_literal(v) for v in value)}]"
    raise TypeError(f"{value!r}: no Hydra literal for {type(value).__name__}")


def run_child(script: str | Path, args: Sequence[str], quiet: bool = True, **kwargs: Any) -> dict:
    """Runs a benchmark script in a fresh process of this interpreter with ``args``, its
    results file in a temporary folder; returns that file (`read_results`). ``quiet``: its
    output captured (the end of its error output goes into the error when it fails), else
    passed through. ``kwargs`` go to `subprocess.run` (``env``, ``cwd``)."""
    with tempfile.TemporaryDirectory(prefix="bench-child-") as tmp:
        command = [sys.executable, str(script), *args, override("results", tmp)]
        done = subprocess.run(command, capture_output=quiet, text=True, **kwargs)
        if done.returncode != 0:
            tail = f":\n{done.stderr[-3000:]}" if quiet else ""
            raise RuntimeError(f"{shlex.join(command)} exited with {done.returncode}{tail}")
        (path,) = Path(tmp).glob("*.json")
        return read_results(path)


def measure_stage(
    script: str | Path,
    stage: str,
    args: Sequence[str],
    folder: Path,
    memory_cap_mb: int | None = None,
) -> dict:
    """Runs ``script stage=<stage> report=<folder>/<stage>.json args...`` in a fresh process
    of this interpreter (its output in ``<folder>/<stage>.log``) and returns the figures it
    wrote to the report, with ``wall_s`` and ``peak_mb``: the child's peak resident memory,
    read with ``wait4`` (the usage of this child alone; ``getrusage(RUSAGE_CHILDREN)`` gives the
    largest peak of every child so far).

    ``memory_cap_mb``: the child runs in a memory cgroup of its own with that limit (resident
    memory and page cache together, as a container's limit; cgroup v2 or v1, which needs
    root); `MemoryCapError` where none can be made.
    """
    report = folder / f"{stage}.json"
    log = folder / f"{stage}.log"
    cmd = [sys.executable, str(script), f"stage={stage}", override("report", report), *args]
    cgroup = None if memory_cap_mb is None else _memory_cgroup(folder.name, memory_cap_mb)
    join = None if cgroup is None else partial(_join_cgroup, cgroup)
    start = time.perf_counter()
    try:
        with log.open("w") as out:
            proc = subprocess.Popen(
                cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, preexec_fn=join
            )
            _, status, usage = os.wait4(proc.pid, 0)
    finally:
        if cgroup is not None:
            cgroup.rmdir()
    code = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if code != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{shlex.join(cmd)} exited with {code}:\n{tail}")
    return {**json.loads(report.read_text()), "wall_s": wall, "peak_mb": usage.ru_maxrss / 1024}


class MemoryCapError(RuntimeError):
    """No memory cgroup can be made here (not root, or no memory controller)."""


def _memory_cgroup(name: str, limit_mb: int) -> Path:
    """A new memory cgroup limited to ``limit_mb``, under cgroup v2's root or v1's memory
    hierarchy."""
    limit = str(limit_mb * 2**20)
    root = Path("/sys/fs/cgroup")
    for parent, limit_file, marker in (
        (root, "memory.max", "cgroup.controllers"),  # v2: the unified hierarchy
        (root / "memory", "memory.limit_in_bytes", "memory.limit_in_bytes"),  # v1
    ):
        if not (parent / marker).is_file():
            continue
        group = parent / f"recsys-bench-{os.getpid()}-{name}"
        try:
            group.mkdir()
            (group / limit_file).write_text(limit)
        except OSError:
            if group.is_dir():
                group.rmdir()
            continue
        return group
    raise MemoryCapError(
        "cannot make a memory cgroup (cgroup v2 /sys/fs/cgroup/memory.max or v1 "
        "/sys/fs/cgroup/memory/): run as root on a machine with the memory controller"
    )


def _join_cgroup(group: Path) -> None:
    (group / "cgroup.procs").write_text(str(os.getpid()))


def read_results(path: str | Path) -> dict:
    """A results file, checked against the schema of the module's docstring."""
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {doc.get('schema')!r}, this code reads {SCHEMA}")
    for key in ("name", "command", "settings", "overrides", "started", "env", "rows"):
        if key not in doc:
            raise ValueError(f"{path}: no {key!r}")
    for i, row in enumerate(doc["rows"]):
        if missing := [k for k in ROW_KEYS if k not in row]:
            raise ValueError(f"{path}: row {i} has no {missing}")
    return doc


def write_json(path: Path, document: Any) -> None:
    """``document`` as JSON at ``path``, atomically: a temporary file beside it, then
    renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(document, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- rounds ----------------------------------------------------------------------------------


def alternating_rounds(
    systems: Sequence[K], rounds: int, measure: Callable[[K], T]
) -> dict[K, list[T]]:
    """``measure(system)`` once per system and round, back to back, the order reversed every
    other round (no system always runs first, after the same neighbour, or in a warmer
    machine); each system's results in round order. A shared machine's speed drifts over
    minutes, so compare systems within rounds (`paired`)."""
    runs: dict[K, list[T]] = {s: [] for s in systems}
    for r in range(rounds):
        for system in systems if r % 2 == 0 else list(systems)[::-1]:
            runs[system].append(measure(system))
    return runs


def paired(
    runs: Sequence[float], baseline: Sequence[float], compare: Callable[[float, float], float]
) -> list[float]:
    """``compare(run, baseline run)`` for each round (e.g. `operator.truediv` for ratios,
    `operator.sub` for differences); their median is the paired figure."""
    if len(runs) != len(baseline):
        raise ValueError(f"{len(runs)} runs against {len(baseline)} of the baseline: not paired")
    return [compare(a, b) for a, b in zip(runs, baseline, strict=True)]


def median(values: Iterable[float]) -> float:
    return float(statistics.median(values))


# --- reference loops ------------------------------------------------------------------------


def reference_optimizer(module, params: Iterable) -> Any:
    """An optimizer over ``params`` (a reference loop's) of the class and settings that the
    platform's ``module.configure_optimizers()`` builds (a `RecommenderModule`'s; e.g. fused
    Adam at the config's learning rate), so that a reference loop and the platform take the
    same update from one source. Refuses what one plain optimizer cannot copy: a learning-rate
    schedule, parts with their own optimizers (``model.sparse_optimizer``) or several
    parameter groups."""
    built = module.configure_optimizers()
    if isinstance(built, dict):
        raise ValueError(
            "the platform's optimizer comes with a learning-rate schedule (model.lr_scheduler), "
            "which a reference loop does not run: set model.lr_scheduler=null"
        )
    if hasattr(built, "parts") or len(built.param_groups) != 1:
        raise ValueError(
            f"the platform's {type(built).__name__} has {len(built.param_groups)} parameter "
            "groups (model.sparse_optimizer?); a reference loop copies one optimizer of one "
            "group: set model.sparse_optimizer=null"
        )
    group = {k: v for k, v in built.param_groups[0].items() if k != "params"}
    return type(built)(list(params), **group)


# --- the environment -------------------------------------------------------------------------


def git_state(root: Path = REPO) -> dict[str, Any]:
    """``git_sha`` (HEAD) and ``git_dirty`` (changes to tracked files, ``benchmarks/results/``
    left out) of the checkout at ``root``; both None where it is not one."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"]
            + ["--", ".", ":(exclude)benchmarks/results"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"git_sha": None, "git_dirty": None}
    return {"git_sha": sha, "git_dirty": bool(status.strip())}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere `platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(git: dict[str, Any] | None = None) -> dict[str, Any]:
    """The machine and software a figure was measured on (the ``env`` of a results file).
    ``git``: a `git_state` taken earlier (default: now)."""
    import torch

    cuda = torch.cuda.is_available()
    cpu = cpu_model()
    return {
        **(git_state() if git is None else git),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name() if cuda else cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lightning": _version("lightning"),
        "torchrec": _version("torchrec"),
    }


def process_start() -> float:
    """This process's start as a `time.time`: from ``/proc`` (the process's start in clock
    ticks after boot, against the uptime now), so it counts the interpreter's start-up and
    every import. Where there is no ``/proc``: the time this module was first imported."""
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return _IMPORTED
    # the fields after the command name, which may hold spaces: starttime is field 22
    started = int(stat.rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    return time.time() - (uptime - started)


_IMPORTED = time.time()


# --- helpers ---------------------------------------------------------------------------------


def _script() -> str:
    """The running script, relative to the checkout where it is inside it."""
    path = Path(sys.argv[0]).resolve()
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def _number(value: Any) -> float | int | None:
    """A JSON number; None for none, NaN and infinities (JSON has no NaN)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def _plain(value: Any) -> Any:
    """JSON's types: numpy and torch scalars to numbers, tuples to lists, paths to strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{value!r} ({type(value).__name__}) has no JSON form")
