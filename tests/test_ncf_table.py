"""NeuMF initialised from GMF and MLP runs (He et al. 2017, Section 3.4.1), the plain MF of the
NCF table, and the table's command (benchmarks/ncf_table.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from recsys.data.store import FeatureStore
from recsys.lit import RecommenderModule
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


def _module(make_cfg, *overrides: str) -> tuple[RecommenderModule, FeatureStore]:
    cfg = make_cfg("experiment=ncf_neumf_pretrained", *TINY, *overrides)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup()
    return instantiate(cfg.model, spec=dm.spec.to_dict(), _recursive_=False), dm.data.features


def test_pretrained_neumf_starts_from_its_sources(make_cfg, sources):
    module, features = _module(make_cfg, _pretrained(sources), f"model.alpha={ALPHA}")
    module.setup("fit")  # where a fit loads the sources
    gmf, mlp = (RecommenderModule.load_from_checkpoint(sources[v]).eval() for v in ("gmf", "mlp"))
    own = module.net.state_dict()
    for source, prefix in ((gmf, "gmf_"), (mlp, "mlp")):
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
    torch.testing.assert_close(trained.net.gmf_item.weight, gmf.net.gmf_item.weight)


def test_sources_of_other_sizes_are_refused(make_cfg, sources):
    module, _ = _module(make_cfg, _pretrained(sources), "model.gmf_dim=8")
    with pytest.raises(ValueError, match=r"epoch_000\.ckpt gives gmf_user\.weight the shape"):
        module.setup("fit")


def test_sources_must_be_of_their_variant(make_cfg, sources):
    swapped = {"gmf": sources["mlp"], "mlp": sources["gmf"]}
    module, _ = _module(make_cfg, _pretrained(swapped))
    with pytest.raises(ValueError, match="not of NeuMF variant 'gmf'"):
        module.setup("fit")


def test_mf_is_a_dot_product_plus_biases(make_cfg):
    module, features = _module(make_cfg, "model.variant=mf", "model.pretrained=null")
    net = module.net
    for p in net.parameters():
        torch.nn.init.normal_(p)
    users, items = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    expected = (
        (net.gmf_user.weight[users] * net.gmf_item.weight[items]).sum(1)
        + net.user_bias.weight[users, 0]
        + net.item_bias.weight[items, 0]
        + net.bias
    )
    with torch.no_grad():
        torch.testing.assert_close(net(features.make_batch(users, items)), expected)


@pytest.mark.slow
def test_the_table_command_runs(data_dir, cache_dir, tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ncf_table.py"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            "quick=true",
            f"out={tmp_path}",
            f"paths.data_dir={data_dir}",
            f"paths.cache_dir={cache_dir}",
            "+trainer.limit_train_batches=3",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for label in ("popularity", "MF", "GMF", "MLP", "NeuMF", "NeuMF pretrained"):
        assert f"| {label}" in done.stdout
    assert "NeuMF time to HR@10 >= 0.7 on the test items" in done.stdout
    # the clock's test HR@10 after the one validation is the test of the checkpoint it saved
    (entry,) = [json.loads(x) for x in (tmp_path / "neumf" / "validation_clock.jsonl").open()]
    metrics = json.loads((tmp_path / "neumf" / "metrics.json").read_text())
    assert entry["test/hr@10"] == pytest.approx(metrics["test/hr@10"], abs=1e-6)


def test_the_summary_over_seeds_gives_mean_and_spread(capsys):
    """``ncf_table.py seeds=[...]``: each model's mean and sample standard deviation over the
    seeds' test figures, and each seed's HR@10 (numpy computes them independently)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from ncf_table import LABELS, print_summary

    hr = {42: 0.70, 1: 0.71, 2: 0.73}
    tables = {}
    for seed, h in hr.items():
        runs = {
            name: ({"test/hr@10": h + i / 100, "test/ndcg@10": h / 2}, 1.0)
            for i, name in enumerate(LABELS)
        }
        runs["neumf"][0].update({"popularity/test/hr@10": 0.46, "popularity/test/ndcg@10": 0.25})
        tables[seed] = (runs, {})
    print_summary(tables)
    lines = {line.split(" | ")[0]: line for line in capsys.readouterr().out.splitlines()}
    gmf = np.array(list(hr.values())) + list(LABELS).index("gmf") / 100
    assert f"| GMF | {gmf.mean():.4f} ± {gmf.std(ddof=1):.4f} |" in lines["| GMF"]
    assert lines["| GMF"].endswith(" | " + " / ".join(f"{x:.4f}" for x in gmf) + " |")
    assert "| popularity | 0.4600 ± 0.0000 | 0.2500 ± 0.0000 |" in lines["| popularity"]
