"""The performance suite (benchmarks/): that its reference loop trains the platform's model
with the platform's optimizer, and that every script runs end to end and writes its results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from recsys import bench
from recsys.data import FeatureSpec
from recsys.data.negatives import PositiveSet
from recsys.data.store import FeatureStore
from recsys.models import NeuMF

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from bare_neumf import BareNeuMF, sample_negatives  # noqa: E402
from step_cost import WARMUP, phases  # noqa: E402
from training import bare_parts, compose_run  # noqa: E402


def test_the_bare_loop_trains_the_platforms_neumf():
    """Same weights, same logits: the throughput comparison is of one model."""
    spec = FeatureSpec.of_ids(num_users=9, num_items=30)
    torch.manual_seed(0)
    bare = BareNeuMF(9, 30, gmf_dim=4, mlp_dim=6, layers=[8, 4])
    ours = NeuMF(spec, variant="neumf", gmf_dim=4, mlp_dim=6, mlp_layers=[8, 4])
    ours.load_state_dict(bare.state_dict())  # NeuMF's names of before its towers load too
    users, items = torch.randint(9, (50,)), torch.randint(30, (50,))
    with torch.no_grad():
        expected = bare(users, items)
        got = ours(FeatureStore(spec, None, None).make_batch(users, items))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    "overrides", [[], ["model.optimizer.lr=0.005", "model.optimizer.weight_decay=1e-6"]]
)
def test_the_bare_loop_steps_with_the_platforms_optimizer(overrides):
    """The reference loop of the throughput table takes the optimizer that the platform's
    ``configure_optimizers`` builds for the same config: same class, same settings (fused
    Adam), over the bare model's parameters; overrides of ``model.optimizer`` reach both."""
    cfg = compose_run(quick=False, overrides=overrides, batch=1280)
    spec = FeatureSpec.of_ids(num_users=9, num_items=30)
    model, optimizer = bare_parts(cfg, spec)
    platform = instantiate(cfg.model, spec=spec.to_dict(), _recursive_=False)
    expected = platform.configure_optimizers()

    def settings(opt: torch.optim.Optimizer) -> list[dict]:
        return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]

    assert type(optimizer) is type(expected) is torch.optim.Adam
    assert settings(optimizer) == settings(expected)
    assert optimizer.param_groups[0]["fused"] is True  # conf/model/ncf.yaml
    assert optimizer.param_groups[0]["lr"] == cfg.model.optimizer.lr
    params = optimizer.param_groups[0]["params"]
    assert [id(p) for p in params] == [id(p) for p in model.parameters()]


def test_the_bare_loop_refuses_what_it_does_not_train():
    cfg = compose_run(quick=False, overrides=["model.dropout=0.1"], batch=1280)
    with pytest.raises(ValueError, match="'dropout': 0.1"):
        bare_parts(cfg, FeatureSpec.of_ids(num_users=9, num_items=30))


def test_the_bare_loops_negatives_are_never_positives():
    """Never one of the user's items, as `PositiveSet.sample` draws them."""
    g = torch.Generator().manual_seed(0)
    users, items = (
        torch.randint(0, 20, (300,), generator=g),
        torch.randint(0, 25, (300,), generator=g),
    )
    known = torch.unique(users * 25 + items)
    draws = sample_negatives(users, known, 25, 4, g)
    assert not PositiveSet(users, items, 25).contains(users.repeat_interleave(4), draws).any()


def test_step_phases_cut_each_step_at_its_hooks():
    """`step_cost.phases`: each phase from its hooks' timestamps, the batch phase from the
    previous step's end, in ms, the warm-up steps left out."""
    # ms: loading 2, training_step 3, zero_grad 1, backward 4, clipping and update 2
    gaps = {"training_step": 3, "zero_grad": 1, "backward": 4, "clipping": 0.5, "optimizer": 1.5}
    steps, t = [], 0.0
    for i in range(WARMUP + 5):
        t += 2 if i >= WARMUP else 50  # the warm-up steps load slowly
        step = {"start": t}
        for mark, gap in gaps.items():
            t += gap
            step[mark] = t
        steps.append({k: v / 1e3 for k, v in step.items()})
    got = phases(steps)
    expected = {"batch": 2, "training_step": 3, "zero_grad": 1, "backward": 4, "optimizer": 2}
    assert got == pytest.approx({**expected, "step": 12})


@pytest.mark.slow
def test_a_benchmark_writes_its_results(data_dir, cache_dir, tmp_path):
    """``step_cost.py quick=true``, a few steps: ``<results>/step_cost.json`` as the schema
    says, its rows the figures of the printed table."""
    env = {**os.environ, "RECSYS_DATA_DIR": str(data_dir), "RECSYS_CACHE_DIR": str(cache_dir)}
    args = ["quick=true", "steps=13", "modes=[loop,Trainer]", f"out={tmp_path / 'runs'}"]
    args += [f"results={tmp_path}", "data.num_workers=0"]  # a Hydra override of the runs
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "step_cost.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc = bench.read_results(tmp_path / "step_cost.json")
    assert doc["name"] == "step_cost" and doc["overrides"] == ["data.num_workers=0"]
    assert doc["settings"]["steps"] == 13 and doc["settings"]["batches"] == [1280]  # quick's
    assert doc["env"]["torch"] == torch.__version__
    assert doc["env"]["git_sha"] == bench.git_state()["git_sha"]
    step = bench.find(doc["rows"], system="loop", metric="step_ms", batch=1280)
    assert step["unit"] == "ms" and step["statistic"] == "median" and len(step["runs"]) == 1
    diff = bench.find(doc["rows"], system="Trainer", metric="step_ms_difference")
    assert diff["settings"]["baseline"] == "loop"
    trainer = bench.find(doc["rows"], system="Trainer", metric="step_ms")["value"]
    assert diff["value"] == pytest.approx(trainer - step["value"])
    assert "| loop | " in done.stdout and f"{step['value']:.2f}" in done.stdout


@pytest.mark.slow
def test_the_suite_runs_quick(data_dir, cache_dir, tmp_path):
    """``python benchmarks/suite.py quick=true``: every script, small data, its tables printed
    and its results written (under the working directory's ``logs/benchmarks/results``)."""
    env = {**os.environ, "RECSYS_DATA_DIR": str(data_dir), "RECSYS_CACHE_DIR": str(cache_dir)}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "suite.py"), "quick=true"],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # the scripts' run folders and plots go under it
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    out = done.stdout
    names = ("training", "step_cost", "batch_building", "ncf_table", "ranking", "scale")
    names += ("criteo_scale",)
    names += ("table_rows", "serve")
    for name in names:
        assert f"## {name}:" in out
    assert "| effective batch | bare loop | RecBole 1.2.1 | recsys |" in out
    assert "| 1,280 |" in out and "| 4,096 |" in out
    assert "| platform, no progress bar |" in out  # step_cost
    assert "1,280: 490,570 samples in" in out  # batch_building: one epoch of ml-100k
    assert "| NeuMF pretrained" in out  # the NCF table
    assert "users/s" in out  # ranking
    assert "| tables of (users x items) | ids drawn from |" in out  # table_rows
    assert "GET /recommend" in out  # serve
    assert "| 100,000 | dlrm streamed |" in out  # criteo_scale
    for name in names:
        doc = bench.read_results(tmp_path / "logs" / "benchmarks" / "results" / f"{name}.json")
        assert doc["settings"]["quick"] is True and doc["rows"], name
