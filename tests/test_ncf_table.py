"""NeuMF initialised from GMF and MLP runs (He et al. 2017, Section 3.4.1), the plain MF of the
NCF table, and the table's command (benchmarks/ncf_table.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from recsys import bench
from recsys.data.store import FeatureStore
from recsys.lit import RecommenderModule
from recsys.models import MF
from recsys.train import run
from tests.conftest import compose_train

TINY = ["data.variant=100k", "trainer.max_epochs=1", "+trainer.limit_train_batches=3"]
ALPHA = 0.3  # not 0.5, so that swapping the towers' shares would show


@pytest.fixture(scope="module")
def sources(data_dir, cache_dir, tmp_path_factory) -> dict[str, str]:
    """Best checkpoints of a one-epoch GMF and MLP run of the table's experiments on ml-100k."""
    out = {}
    for variant in ("gmf", "mlp"):
        folder = tmp_path_factory.mktemp(variant)
        metrics = run(
            compose_train(data_dir, cache_dir, folder, f"experiment=ncf_{variant}", *TINY)
        )
        out[variant] = metrics["best_model_path"]
    return out


def _pretrained(sources: dict[str, str]) -> str:
    return f"model.pretrained={{gmf: '{sources['gmf']}', mlp: '{sources['mlp']}'}}"


def _module(
    make_cfg, *overrides: str, experiment: str = "ncf_neumf_pretrained"
) -> tuple[RecommenderModule, FeatureStore]:
    cfg = make_cfg(f"experiment={experiment}", *TINY, *overrides)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup()
    return instantiate(cfg.model, spec=dm.spec.to_dict(), _recursive_=False), dm.data.features


def test_pretrained_neumf_starts_from_its_sources(make_cfg, sources):
    module, features = _module(make_cfg, _pretrained(sources), f"model.alpha={ALPHA}")
    module.setup("fit")  # where a fit loads the sources
    gmf, mlp = (RecommenderModule.load_from_checkpoint(sources[v]).eval() for v in ("gmf", "mlp"))
    own = module.net.state_dict()
    for source, prefix in ((gmf, "gmf."), (mlp, "mlp.")):
        for name, value in source.net.state_dict().items():
            if name.startswith(prefix):
                torch.testing.assert_close(own[name], value, rtol=0, atol=0)
    users, items = torch.arange(50), torch.arange(50, 100)
    batch = features.make_batch(users, items)
    with torch.no_grad():
        expected = ALPHA * gmf(batch) + (1 - ALPHA) * mlp(batch)
        torch.testing.assert_close(module.eval()(batch), expected)


def test_a_fit_loads_the_sources(make_cfg, sources, tmp_path):
    """Through `recsys.train.run`: with a learning rate of 0 the tested weights are the
    initial ones, which are the sources' towers."""
    cfg = make_cfg(
        "experiment=ncf_neumf_pretrained", *TINY, _pretrained(sources), "model.optimizer.lr=0"
    )
    metrics = run(cfg)
    trained = RecommenderModule.load_from_checkpoint(metrics["best_model_path"])
    gmf = RecommenderModule.load_from_checkpoint(sources["gmf"])
    torch.testing.assert_close(trained.net.gmf.item.weight, gmf.net.gmf.item.weight)


def test_sources_of_other_sizes_are_refused(make_cfg, sources):
    module, _ = _module(make_cfg, _pretrained(sources), "model.gmf_dim=8")
    with pytest.raises(ValueError, match=r"epoch_000\.ckpt gives gmf\.user\.weight the shape"):
        module.setup("fit")


def test_sources_must_be_of_their_variant(make_cfg, sources):
    swapped = {"gmf": sources["mlp"], "mlp": sources["gmf"]}
    module, _ = _module(make_cfg, _pretrained(swapped))
    with pytest.raises(
        ValueError, match="variant='mlp', not of net='recsys.models.NeuMF', variant='gmf'"
    ):
        module.setup("fit")


def test_mf_is_a_dot_product_plus_biases(make_cfg):
    module, features = _module(make_cfg, experiment="ncf_mf")
    net = module.net
    assert isinstance(net, MF)
    for p in net.parameters():
        torch.nn.init.normal_(p)
    users, items = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    expected = (
        (net.user.weight[users] * net.item.weight[items]).sum(1)
        + net.user_bias.weight[users, 0]
        + net.item_bias.weight[items, 0]
        + net.bias
    )
    with torch.no_grad():
        torch.testing.assert_close(net(features.make_batch(users, items)), expected)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_the_table_command_runs(data_dir, cache_dir, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "ncf_table.py"),
            "quick=true",
            f"out={tmp_path}",
            f"results={tmp_path}",
            f"paths.data_dir={data_dir}",
            f"paths.cache_dir={cache_dir}",
            "+trainer.limit_train_batches=3",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for label in ("popularity", "MF", "GMF", "MLP", "NeuMF", "NeuMF pretrained", "EASE", "ItemKNN"):
        assert f"| {label}" in done.stdout
    # the closed-form models: the setting of their grid with the best val/ndcg@10
    grid = {v: tmp_path / "ease" / f"l2_reg_{v}" / "metrics.json" for v in (100.0, 500.0, 2000.0)}
    grid = {v: json.loads(path.read_text()) for v, path in grid.items()}
    best = max(grid, key=lambda v: grid[v]["val/ndcg@10"])
    results = bench.read_results(tmp_path / "ncf_table.json")["rows"]
    assert bench.find(results, model="EASE (Steck 2019)", metric="model.l2_reg")["value"] == best
    ease = bench.find(results, model="EASE (Steck 2019)", metric="test/hr@10")["value"]
    assert ease == pytest.approx(grid[best]["test/hr@10"])
    p = bench.find(results, model="EASE (Steck 2019)", metric="p_vs_neumf/test/hr@10")["value"]
    assert 0 <= p <= 1
    assert "NeuMF time to HR@10 >= 0.7 on the test items" in done.stdout
    # the clock's test HR@10 after the one validation is the test of the checkpoint it saved
    (entry,) = [json.loads(x) for x in (tmp_path / "neumf" / "validation_clock.jsonl").open()]
    metrics = json.loads((tmp_path / "neumf" / "metrics.json").read_text())
    assert entry["test/hr@10"] == pytest.approx(metrics["test/hr@10"], abs=1e-6)
    # the results file holds the printed table's figures
    rows = bench.read_results(tmp_path / "ncf_table.json")["rows"]
    row = bench.find(rows, model="NeuMF", metric="test/hr@10", seed=42)
    assert row["value"] == pytest.approx(metrics["test/hr@10"])
    assert f"| NeuMF | {row['value']:.4f} |" in done.stdout


def _load_ncf_table():
    sys.path.insert(0, str(BENCHMARKS))
    import ncf_table

    return ncf_table


def _fake_table(module, monkeypatch, reached: list[float]) -> None:
    """``module._train`` made a stub: metrics by run, and for NeuMF a clock file whose second
    validation reaches test HR@10 0.71, its time appended to ``reached``."""

    def train(name: str, out: Path, overrides: list[str]) -> tuple[dict, float]:
        if name == "neumf":
            key = "+callbacks.validation_clock.path="
            clock = Path(next(o for o in overrides if o.startswith(key))[len(key) :])
            clock.parent.mkdir(parents=True, exist_ok=True)
            before = {"time": time.time(), "epoch": 0, "val/hr@10": 0.72, "test/hr@10": 0.6}
            reached.append(time.time() + 0.5)
            after = {"time": reached[-1], "epoch": 1, "val/hr@10": 0.8, "test/hr@10": 0.71}
            clock.write_text(f"{json.dumps(before)}\n{json.dumps(after)}\n")
        metrics = {
            "val/ndcg@10": 0.5,
            "test/hr@10": 0.7,
            "test/ndcg@10": 0.4,
            "best_epoch": 1,
            "best_model_path": str(out / "best.ckpt"),
            "popularity/test/hr@10": 0.46,
            "popularity/test/ndcg@10": 0.25,
        }
        return metrics, 2.0

    monkeypatch.setattr(module, "_train", train)
    monkeypatch.setattr(module, "p_against_neumf", lambda runs, name: 0.5)  # no files here


def test_the_time_to_quality_counts_from_the_process_start(tmp_path, monkeypatch, capsys):
    """NeuMF's time to test HR@10 >= 0.70 is the clock's time less the process's start
    (`recsys.bench.process_start`: this pytest process's, imports included), not less a
    moment after the imports."""
    ncf_table = _load_ncf_table()
    reached: list[float] = []
    _fake_table(ncf_table, monkeypatch, reached)
    run = bench.start(
        "ncf_table", ncf_table.Options, None, argv=[f"out={tmp_path}", f"results={tmp_path}"]
    )
    ncf_table.main(run)
    rows = bench.read_results(tmp_path / "ncf_table.json")["rows"]
    ttq = bench.find(rows, model="NeuMF", metric="seconds_to_test/hr@10", seed=42)
    assert ttq["value"] == pytest.approx(reached[0] - bench.process_start(), abs=0.05)
    assert ttq["settings"]["from"] == "process start" and ttq["settings"]["target"] == 0.7
    val = bench.find(rows, model="NeuMF", metric="seconds_to_val/hr@10", seed=42)
    assert val["value"] == pytest.approx(reached[0] - 0.5 - bench.process_start(), abs=0.05)
    assert f"{ttq['value']:.0f} s from the process's start" in capsys.readouterr().out


def test_the_summary_over_seeds_gives_mean_and_spread(capsys):
    """``ncf_table.py seeds=[...]``: each model's mean and sample standard deviation over the
    seeds' test figures, and each seed's HR@10 (numpy computes them independently)."""
    ncf_table = _load_ncf_table()
    hr = {42: 0.70, 1: 0.71, 2: 0.73}
    run = bench.Benchmark("ncf_table", ncf_table.Options(seeds=list(hr)))
    for seed, h in hr.items():
        runs = {
            name: ({"test/hr@10": h + i / 100, "test/ndcg@10": h / 2, "best_epoch": 1}, 1.0)
            for i, name in enumerate(ncf_table.LABELS)
        }
        runs["neumf"][0].update({"popularity/test/hr@10": 0.46, "popularity/test/ndcg@10": 0.25})
        ncf_table.add_rows(run, runs, {"test/hr@10": None, "val/hr@10": 3.0}, {"seed": seed})
    ncf_table.add_summary(run, list(hr))
    ncf_table.print_summary(run.rows, list(hr))
    lines = {line.split(" | ")[0]: line for line in capsys.readouterr().out.splitlines()}
    gmf = np.array(list(hr.values())) + list(ncf_table.LABELS).index("gmf") / 100
    assert f"| GMF | {gmf.mean():.4f} ± {gmf.std(ddof=1):.4f} |" in lines["| GMF"]
    assert lines["| GMF"].endswith(" | " + " / ".join(f"{x:.4f}" for x in gmf) + " |")
    assert "| popularity | 0.4600 ± 0.0000 | 0.2500 ± 0.0000 |" in lines["| popularity"]
    mean = bench.find(run.rows, model="GMF", metric="test/hr@10", seeds=list(hr))
    assert mean["statistic"] == "mean" and mean["runs"] == pytest.approx(list(gmf))


def test_each_seed_runs_in_a_fresh_process(tmp_path, monkeypatch, capsys):
    """``seeds=[...]``: one child process of the script per seed (its own clock), with the
    seed as a Hydra override and its own run folder; their rows and the means over them go
    to ``ncf_table_seeds.json``."""
    ncf_table = _load_ncf_table()
    calls = []

    def run_child(script, args, quiet=True):
        calls.append((Path(script).name, list(args), quiet))
        seed = int(args[-1].removeprefix("seed="))
        child = bench.Benchmark("ncf_table", ncf_table.Options())
        figures = {"test/hr@10": 0.7, "test/ndcg@10": 0.4, "best_epoch": 1}
        runs = {name: (dict(figures), 1.0) for name in ncf_table.LABELS}
        runs["neumf"][0].update({"popularity/test/hr@10": 0.46, "popularity/test/ndcg@10": 0.25})
        ncf_table.add_rows(child, runs, {"test/hr@10": 9.0, "val/hr@10": 3.0}, {"seed": seed})
        return {"rows": child.rows}

    monkeypatch.setattr(ncf_table.bench, "run_child", run_child)
    argv = ["seeds=[7,8]", f"out={tmp_path}", f"results={tmp_path}", "trainer.max_epochs=2"]
    ncf_table.main(bench.start("ncf_table", ncf_table.Options, None, argv=argv))
    assert [c[0] for c in calls] == ["ncf_table.py"] * 2 and not calls[0][2]
    args = calls[1][1]
    assert args[-2:] == ["trainer.max_epochs=2", "seed=8"]
    assert bench.parse(ncf_table.Options, args[:2]) == (
        ncf_table.Options(out=str(tmp_path / "seed_8")),
        [],
    )
    rows = bench.read_results(tmp_path / "ncf_table_seeds.json")["rows"]
    assert bench.find(rows, model="NeuMF", metric="seconds_to_test/hr@10", seed=8)["value"] == 9.0
    mean = bench.find(rows, model="NeuMF", metric="test/hr@10", seeds=[7, 8])
    assert (mean["statistic"], mean["runs"]) == ("mean", [0.7, 0.7])
    assert (
        "| NeuMF | 0.7000 ± 0.0000 | 0.4000 ± 0.0000 | 0.7000 / 0.7000 |" in capsys.readouterr().out
    )
