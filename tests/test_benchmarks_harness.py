"""The benchmarks' harness (`recsys.bench`): settings from the command line, rounds, the
environment, the results file, the process's start, the reference optimizer."""

from __future__ import annotations

import json
import operator
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from recsys import bench
from recsys.bench import Settings
from recsys.lit.optim import CombinedOptimizer


@dataclass
class Options(Settings):
    batches: list[int] = field(default_factory=lambda: [1280, 4096, 20480])
    repeats: int = 3
    out: str = "logs/x"
    modes: list[str] | None = None


QUICK = {"batches": [1280], "repeats": 1}


def test_settings_and_hydra_overrides_are_told_apart():
    argv = [
        "batches=[1280,4096]",
        "data.variant=100k",
        "+trainer.limit_train_batches=3",
        "~callbacks.progress_bar",
        "model.pretrained={gmf: 'a', mlp: 'b'}",
        "repeats=5",
    ]
    opts, overrides = bench.parse(Options, argv)
    assert opts == Options(batches=[1280, 4096], repeats=5)
    assert overrides == argv[1:5]  # in order, as typed


def test_quick_settings_come_first_and_the_command_line_wins():
    opts, _ = bench.parse(Options, ["quick=true"], QUICK)
    assert (opts.batches, opts.repeats, opts.quick) == ([1280], 1, True)
    opts, _ = bench.parse(Options, ["repeats=4", "quick=true"], QUICK)
    assert (opts.batches, opts.repeats) == ([1280], 4)
    opts, _ = bench.parse(Options, [], QUICK)
    assert opts == Options()


def test_bad_settings_are_errors_that_name_them():
    with pytest.raises(ValueError, match="batches"):
        bench.parse(Options, ["batches=[a,b]"])
    with pytest.raises(ValueError, match="repeats=1,2: a setting takes one value"):
        bench.parse(Options, ["repeats=1,2"])
    with pytest.raises(ValueError, match=r"data.variant=1m: not a setting .* settings: \["):
        bench.parse(Options, ["data.variant=1m"], overrides=False)
    with pytest.raises(ValueError, match=r"'repeats=\[1' is not a key=value override"):
        bench.parse(Options, ["repeats=[1"])


@dataclass
class Anything(Settings):
    x: Any = None


@pytest.mark.parametrize(
    "value",
    [
        "/tmp/a b/c,d",
        "it's [here]",
        "platform, no logger",
        None,
        True,
        3,
        0.5,
        [1, 2],
        ["a b", "c"],
    ],
)
def test_an_override_reads_back_as_its_value(value):
    """`bench.override` writes what a parent passes to a child process."""
    assert bench.parse(Anything, [bench.override("x", value)]) == (Anything(x=value), [])


def test_alternating_rounds_reverse_the_order_every_other_round():
    calls = []
    runs = bench.alternating_rounds(["a", "b", "c"], 3, lambda s: calls.append(s) or len(calls))
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert runs == {"a": [1, 6, 7], "b": [2, 5, 8], "c": [3, 4, 9]}


def test_paired_compares_within_rounds():
    assert bench.paired([2.0, 6.0], [1.0, 3.0], operator.truediv) == [2.0, 2.0]
    assert bench.paired([2.0, 6.0], [1.0, 3.0], operator.sub) == [1.0, 3.0]
    with pytest.raises(ValueError, match="2 runs against 1 of the baseline"):
        bench.paired([1.0, 2.0], [1.0], operator.sub)


def test_a_paired_row_is_the_median_of_the_rounds_figures():
    run = bench.Benchmark("x", Settings())
    row = run.add_paired(
        [2.0, 9.0, 6.0],
        [1.0, 3.0, 3.0],
        operator.truediv,
        system="a",
        model="m",
        metric="ratio",
        unit="x",
        settings={"baseline": "b"},
    )
    assert row["runs"] == [2.0, 3.0, 2.0] and row["value"] == 2.0
    assert row["statistic"] == "median" and run.rows == [row]


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_git_state_is_the_commit_and_whether_tracked_files_changed(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "a.py").write_text("a = 1\n")
    (tmp_path / "benchmarks" / "results" / "x.json").write_text("{}\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    sha = _git(tmp_path, "rev-parse", "HEAD")
    assert bench.git_state(tmp_path) == {"git_sha": sha, "git_dirty": False}
    (tmp_path / "benchmarks" / "results" / "x.json").write_text('{"new": 1}\n')
    (tmp_path / "untracked.py").write_text("")
    assert bench.git_state(tmp_path)["git_dirty"] is False  # results and new files: clean
    (tmp_path / "a.py").write_text("a = 2\n")
    assert bench.git_state(tmp_path) == {"git_sha": sha, "git_dirty": True}
    assert bench.git_state(tmp_path / "nowhere") == {"git_sha": None, "git_dirty": None}


def test_the_environment_names_the_machine_and_the_versions():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        env = bench.environment()
    finally:
        torch.set_num_threads(threads)
    assert env["git_sha"] == _git(bench.REPO, "rev-parse", "HEAD")
    assert isinstance(env["git_dirty"], bool)
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert f": {env['cpu']}\n" in cpuinfo and "model name" in cpuinfo
    assert env["threads"] == 1 and env["cpus"] == os.cpu_count()
    cuda = torch.cuda.is_available()
    assert env["device"] == ("cuda" if cuda else "cpu")
    assert env["device_name"] == (torch.cuda.get_device_name() if cuda else env["cpu"])
    assert env["python"] == platform.python_version()
    assert (env["torch"], env["cuda"]) == (torch.__version__, torch.version.cuda)
    assert env["lightning"] == metadata.version("lightning")
    assert env["torchrec"] == metadata.version("torchrec")
    json.dumps(env)


def test_a_results_file_is_written_whole_and_reads_back(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/x.py", "repeats=2", "data.variant=100k"])
    run = bench.start("x", Options, None, argv=[f"results={tmp_path}", "data.variant=100k"])
    runs = [np.float64(2.0), np.float32(4.0)]
    run.add(
        system="recsys",
        model="NeuMF",
        metric="samples_per_sec",
        unit="samples/s",
        value=np.median(runs),
        settings={"batch": np.int64(1280), "path": Path("/a")},
        statistic="median",
        runs=runs,
    )
    run.add(system="recsys", model="NeuMF", metric="seconds_to_x", unit="s", value=float("nan"))
    path = run.write()
    assert path == tmp_path / "x.json" and os.listdir(tmp_path) == ["x.json"]
    doc = bench.read_results(path)
    assert doc["schema"] == 1 and doc["name"] == "x"
    assert doc["command"] == "python benchmarks/x.py repeats=2 data.variant=100k"
    assert doc["settings"] == {
        "quick": False,
        "results": str(tmp_path),
        "batches": [1280, 4096, 20480],
        "repeats": 3,
        "out": "logs/x",
        "modes": None,
    }
    assert doc["overrides"] == ["data.variant=100k"]
    assert doc["rows"] == [
        {
            "system": "recsys",
            "model": "NeuMF",
            "metric": "samples_per_sec",
            "unit": "samples/s",
            "value": 3.0,
            "settings": {"batch": 1280, "path": "/a"},
            "statistic": "median",
            "runs": [2.0, 4.0],
        },
        {
            "system": "recsys",
            "model": "NeuMF",
            "metric": "seconds_to_x",
            "unit": "s",
            "value": None,  # JSON has no NaN
            "settings": {},
        },
    ]
    assert set(doc["env"]) == {
        "git_sha",
        "git_dirty",
        "cpu",
        "cpus",
        "threads",
        "device",
        "device_name",
        "python",
        "torch",
        "cuda",
        "lightning",
        "torchrec",
    }
    assert bench.find(doc["rows"], metric="samples_per_sec", batch=1280)["value"] == 3.0
    assert bench.find(doc["rows"], metric="samples_per_sec", batch=4096) is None


def test_results_go_to_the_repository_and_quick_ones_to_logs():
    assert bench.Benchmark("x", Options()).folder == bench.REPO / "benchmarks" / "results"
    assert bench.Benchmark("x", Options(quick=True)).folder == Path("logs/benchmarks/results")
    assert bench.Benchmark("x", Options(quick=True, results="r")).folder == Path("r")


def test_rows_and_files_that_break_the_schema_are_refused(tmp_path):
    run = bench.Benchmark("x", Options())
    with pytest.raises(ValueError, match="give statistic and runs together"):
        run.add(system="s", model="m", metric="x", unit="", value=1.0, runs=[1.0])
    doc = {**run.document(), "rows": [{"system": "s", "value": 1.0}]}
    (tmp_path / "x.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"row 0 has no \['model', 'metric', 'unit', 'settings'\]"):
        bench.read_results(tmp_path / "x.json")
    (tmp_path / "x.json").write_text(json.dumps({**doc, "schema": 0}))
    with pytest.raises(ValueError, match="schema 0, this code reads 1"):
        bench.read_results(tmp_path / "x.json")


def test_process_start_is_before_the_imports():
    """A process that sleeps a second before it imports anything: its start is a second
    before the import, and before the first line of the script."""
    code = (
        "import time; first = time.time(); time.sleep(1)\n"
        "from recsys.bench import process_start\n"
        "print(first - process_start(), time.time() - process_start())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before_first_line, age = map(float, done.stdout.split())
    assert 0 <= before_first_line < 1.0  # the interpreter's start-up, with 0.02 s of ticks
    assert age >= 1.0


def test_process_start_of_this_process_is_its_age():
    started = bench.process_start()
    assert started <= time.time() - 0.01
    assert bench.process_start() == pytest.approx(started, abs=0.05)  # stable across calls


def _module(**optim):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from recsys.data import FeatureSpec
    from tests.conftest import CONF_DIR

    cfg = OmegaConf.load(CONF_DIR / "model" / "ncf.yaml")
    cfg.merge_with(optim)
    spec = FeatureSpec.of_ids(num_users=5, num_items=7)
    return instantiate(cfg, spec=spec.to_dict(), _recursive_=False)


def test_the_reference_optimizer_copies_the_platforms():
    module = _module(optimizer={"lr": 0.01, "weight_decay": 1e-6})
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = bench.reference_optimizer(module, params)
    assert type(optimizer) is torch.optim.Adam and optimizer.param_groups[0]["params"] == params
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["fused"]) == (0.01, 1e-6, True)


def test_the_reference_optimizer_refuses_what_one_optimizer_cannot_copy():
    params = [torch.nn.Parameter(torch.zeros(3))]
    schedule = {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 1}
    with pytest.raises(ValueError, match="model.lr_scheduler=null"):
        bench.reference_optimizer(_module(lr_scheduler=schedule), params)
    adam = {"_target_": "torch.optim.Adam", "_partial_": True}
    module = _module(sparse_optimizer=adam)
    assert isinstance(module.configure_optimizers(), CombinedOptimizer)
    with pytest.raises(ValueError, match="model.sparse_optimizer=null"):
        bench.reference_optimizer(module, params)
