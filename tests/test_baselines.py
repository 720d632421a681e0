"""The popularity baseline: calibrated probabilities, ranking by training popularity."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torchmetrics.functional.classification import binary_auroc

from recsys.baselines import popularity_module
from recsys.data.spec import FeatureSpec
from recsys.models import Popularity


def _ml100k(make_cfg, *overrides):
    cfg = make_cfg("data=movielens", "data.variant=100k", *overrides)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup()
    like = instantiate(cfg.model, spec=dm.spec.to_dict(), _recursive_=False)
    return dm, popularity_module(dm, like)


def _test(module, dm) -> dict[str, float]:
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.test(module, datamodule=dm, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def _test_probs(module, dm) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted probabilities and labels of the test pairs, scored outside the Trainer."""
    pairs = dm.protocol.eval_pairs("test")
    with torch.no_grad():
        logits = module(dm.data.features.make_batch(pairs.users, pairs.items))
    return torch.sigmoid(logits.double()), pairs.labels.double()


def _logloss(p: torch.Tensor, y: torch.Tensor) -> float:
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def _spec(num_items: int) -> FeatureSpec:
    return FeatureSpec(num_users=1, num_items=num_items)


def test_fit_recovers_known_platt_parameters():
    counts = torch.tensor([0.0, 1, 3, 10, 30, 100, 300])
    p = torch.sigmoid(0.7 * torch.log1p(counts) - 2.0)
    weights = torch.full_like(counts, 1000.0)  # exact expected counts: the optimum is (0.7, -2)
    net = Popularity(_spec(len(counts))).fit(counts, weights * p, weights * (1 - p))
    assert float(net.a) == pytest.approx(0.7, abs=1e-4)
    assert float(net.b) == pytest.approx(-2.0, abs=1e-4)


def test_fit_without_popularity_signal_predicts_base_rate():
    # popular items are less often positive: a would be negative, so a = 0 and the base rate
    counts = torch.tensor([1.0, 10, 100])
    positives, negatives = torch.tensor([8.0, 5, 2]), torch.tensor([2.0, 5, 8])
    net = Popularity(_spec(3)).fit(counts, positives, negatives)
    assert float(net.a) == 0.0
    assert float(torch.sigmoid(net.b)) == pytest.approx(15 / 30, abs=1e-6)
    with pytest.raises(ValueError, match="positive and negative examples"):
        net.fit(counts, positives, torch.zeros(3))


def test_explicit_baseline_is_calibrated_on_ml100k(make_cfg):
    dm, module = _ml100k(make_cfg)
    metrics = _test(module, dm)
    p, y = _test_probs(module, dm)
    train_rate = float(dm.data.interactions.labels[dm.rows["train"]].double().mean())
    test_rate = float(y.mean())
    constant = _logloss(torch.full_like(y, train_rate), y)
    accuracy = float(((p > 0.5).double() == y).double().mean())
    print(
        f"ml-100k explicit popularity: test logloss {metrics['popularity/test/logloss']:.4f} "
        f"(constant rate {constant:.4f}), "
        f"accuracy {metrics['popularity/test/accuracy']:.4f} (positive rate {test_rate:.4f}), "
        f"mean probability {float(p.mean()):.4f} (train rate {train_rate:.4f})"
    )
    assert float(p.mean()) == pytest.approx(train_rate, abs=0.02)
    assert metrics["popularity/test/logloss"] == pytest.approx(_logloss(p, y), rel=1e-4)
    assert metrics["popularity/test/logloss"] < min(constant - 0.005, math.log(2))
    assert metrics["popularity/test/accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert bool((p < 0.5).any()) and bool((p > 0.5).any())
    assert metrics["popularity/test/accuracy"] > max(test_rate, 1 - test_rate) + 0.02


def test_implicit_baseline_is_calibrated_on_ml100k(make_cfg):
    dm, module = _ml100k(make_cfg, "data.feedback=implicit", "data.num_negatives=4")
    metrics = _test(module, dm)
    p, y = _test_probs(module, dm)
    constant = _logloss(torch.full_like(y, 1 / 5), y)
    print(
        f"ml-100k implicit popularity: test logloss {metrics['popularity/test/logloss']:.4f} "
        f"(constant rate {constant:.4f}), "
        f"accuracy {metrics['popularity/test/accuracy']:.4f}, mean probability "
        f"{float(p.mean()):.4f}"
    )
    assert float(p.mean()) == pytest.approx(1 / 5, abs=0.02)
    assert metrics["popularity/test/logloss"] == pytest.approx(_logloss(p, y), rel=1e-4)
    assert metrics["popularity/test/logloss"] < constant - 0.05
    assert metrics["popularity/test/accuracy"] > float(1 - y.mean())  # beats "all negative"


def test_baseline_ranks_by_training_popularity(make_cfg):
    dm, module = _ml100k(make_cfg, "data.ranking=sampled")
    counts = dm.protocol.item_popularity()
    items = torch.arange(dm.spec.num_items)
    with torch.no_grad():
        scores = module(dm.data.features.make_batch(torch.zeros_like(items), items))
    order = counts.argsort(stable=True)
    dc, ds = counts[order].diff(), scores[order].diff()
    assert bool((ds[dc > 0] > 0).all()) and bool((ds[dc == 0] == 0).all())

    metrics = _test(module, dm)
    pairs = dm.protocol.eval_pairs("test")
    by_counts = binary_auroc(counts[pairs.items] / counts.max(), pairs.labels.long())
    assert metrics["popularity/test/auroc"] == pytest.approx(float(by_counts), abs=1e-6)
    raw = copy.deepcopy(module)  # the uncalibrated score log(1 + count): same ranking metrics
    raw.net.a.fill_(1.0)
    raw.net.b.fill_(0.0)
    raw_metrics = _test(raw, dm)
    ranked = [k for k in metrics if k.split("/")[-1].startswith(("auroc", "hr@", "ndcg@", "mrr"))]
    assert "popularity/test/hr@10" in ranked
    for k in ranked:
        assert metrics[k] == pytest.approx(raw_metrics[k], abs=1e-6), k


def test_fitted_baseline_reloads(make_cfg):
    dm, module = _ml100k(make_cfg)
    print(f"ml-100k explicit popularity: a {float(module.net.a):.4f} b {float(module.net.b):.4f}")
    fresh = type(module)(**module.hparams)
    fresh.load_state_dict(module.state_dict())
    for name in ("counts", "a", "b"):
        assert torch.equal(getattr(fresh.net, name), getattr(module.net, name)), name
    assert float(fresh.net.a) > 0
