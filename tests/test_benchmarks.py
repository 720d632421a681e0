"""The performance suite (benchmarks/): that its reference loop trains the platform's model,
and that every script runs end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recsys.data import FeatureSpec
from recsys.data.negatives import PositiveSet
from recsys.data.store import FeatureStore
from recsys.models import NeuMF

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from bare_neumf import BareNeuMF, sample_negatives  # noqa: E402
from step_cost import WARMUP, phases  # noqa: E402


def test_the_bare_loop_trains_the_platforms_neumf():
    """Same weights, same logits: the throughput comparison is of one model."""
    spec = FeatureSpec.of_ids(num_users=9, num_items=30)
    torch.manual_seed(0)
    bare = BareNeuMF(9, 30, gmf_dim=4, mlp_dim=6, layers=[8, 4])
    ours = NeuMF(spec, variant="neumf", gmf_dim=4, mlp_dim=6, mlp_layers=[8, 4])
    ours.load_state_dict(bare.state_dict())  # the same parameter names and shapes
    users, items = torch.randint(9, (50,)), torch.randint(30, (50,))
    with torch.no_grad():
        expected = bare(users, items)
        got = ours(FeatureStore(spec, None, None).make_batch(users, items))
    torch.testing.assert_close(got, expected)


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
def test_the_suite_runs_quick(data_dir, cache_dir, tmp_path):
    """``python benchmarks/suite.py quick=true``: every script, small data, its tables printed."""
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
    for name in ("training", "step_cost", "ncf_table", "ranking", "scale", "table_rows", "serve"):
        assert f"## {name}:" in out
    assert "| effective batch | bare loop | RecBole 1.2.1 | recsys |" in out
    assert "| 1,280 |" in out and "| 4,096 |" in out
    assert "| platform, no progress bar |" in out  # step_cost
    assert "| NeuMF pretrained" in out  # the NCF table
    assert "users/s" in out  # ranking
    assert "| tables of (users x items) | ids drawn from |" in out  # table_rows
    assert "GET /recommend" in out  # serve
