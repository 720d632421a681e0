"""Implicit feedback: negative sampling, fixed evaluation negatives, the BPR loss."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from recsys.baselines import evaluate_with_baseline
from recsys.data.loader import BatchIndex
from recsys.data.negatives import PositiveSet, bpr_loss
from recsys.train import build, run


def _implicit_dm(make_cfg, *overrides):
    cfg = make_cfg("data=movielens", "data.variant=100k", "data.feedback=implicit", *overrides)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup()
    return dm


def test_sampled_negatives_are_never_positives(make_cfg):
    dm = _implicit_dm(make_cfg)
    inter = dm.data.interactions
    observed = set(zip(inter.users.tolist(), inter.items.tolist(), strict=True))
    users = torch.randint(dm.spec.num_users, (20_000,))
    negatives = dm.positives.sample(users, 5)
    assert negatives.shape == (20_000, 5)
    pairs = zip(users.repeat_interleave(5).tolist(), negatives.flatten().tolist(), strict=True)
    assert not any(p in observed for p in pairs)


def test_training_batches_pair_positives_with_fresh_negatives(make_cfg):
    dm = _implicit_dm(make_cfg, "data.batch_size=128", "data.num_negatives=3")
    assert bool((dm.data.interactions.labels == 1).all())
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    assert len(batch) == 128 * 4
    assert batch.labels[:128].eq(1).all() and batch.labels[128:].eq(0).all()
    users, items = batch.ids("user_id"), batch.ids("item_id")
    # negative j of positive b sits at 128 + 3b + j and belongs to the same user
    assert torch.equal(users[128:].view(128, 3), users[:128, None].expand(128, 3))
    assert not dm.train_positives.contains(users[128:], items[128:]).any()
    again = next(iter(loader))  # the same epoch again: the same positives and negatives
    assert torch.equal(again.ids("item_id"), items)
    # the same rows in the next epoch get new negatives
    first = next(iter(loader.sampler))
    loader.sampler.set_epoch(1)
    later = loader.dataset[BatchIndex(first.rows, next(iter(loader.sampler)).seed)]
    assert torch.equal(later.ids("item_id")[:128], items[:128])
    assert (later.ids("item_id")[128:] != items[128:]).float().mean() > 0.9


def test_training_negatives_exclude_only_training_positives(make_cfg):
    """The NCF protocol: a user's held-out items can be training negatives; only the
    training pairs are excluded (else the model is never pushed down on exactly the items
    it is ranked on later)."""
    dm = _implicit_dm(make_cfg, "data.split.kind=leave_one_out", "data.batch_size=4096")
    inter = dm.data.interactions
    held_out = torch.cat([dm.rows["val"], dm.rows["test"]])
    held = PositiveSet(inter.users[held_out], inter.items[held_out], dm.spec.num_items)
    hits = drawn = 0
    for batch in dm.train_dataloader():
        p = int(batch.labels.sum())
        users, items = batch.ids("user_id")[p:], batch.ids("item_id")[p:]
        assert not dm.train_positives.contains(users, items).any()
        hits += int(held.contains(users, items).sum())
        drawn += len(items)
    # expected: sum over users of 2 held-out items x 4 draws x n_u / (items - n_u), ~500
    train_users = inter.users[dm.rows["train"]]
    n_u = torch.bincount(train_users, minlength=dm.spec.num_users).double()
    expected = float((2 * 4 * n_u / (dm.spec.num_items - n_u)).sum())
    print(f"held-out items among {drawn:,} training negatives: {hits} (expected ~{expected:.0f})")
    assert 0.7 * expected < hits < 1.3 * expected


def test_evaluation_negatives_fixed_by_seed(make_cfg):
    a = _implicit_dm(make_cfg).protocol.eval_pairs("test")
    b = _implicit_dm(make_cfg).protocol.eval_pairs("test")
    c = _implicit_dm(make_cfg, "seed=7").protocol.eval_pairs("test")
    assert torch.equal(a.items, b.items) and torch.equal(a.users, b.users)
    assert not torch.equal(a.items, c.items)
    assert int(a.labels.sum()) * 5 == len(a.labels)  # one positive, four negatives


def test_user_with_every_item_has_no_negative():
    positives = PositiveSet(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]), num_items=2)
    assert positives.sample(torch.tensor([1]), 3).eq(1).all()
    with pytest.raises(ValueError, match="user code 0 has 0 of 2 items left as negatives"):
        positives.sample(torch.tensor([0]), 1)


def test_nth_negative_against_a_listing_of_each_users_non_positives():
    g = torch.Generator().manual_seed(0)
    users = torch.randint(0, 30, (600,), generator=g)
    items = torch.randint(0, 40, (600,), generator=g)
    positives = PositiveSet(users, items, num_items=40)
    for u in range(32):  # 30, 31: users past the last one, with no positives
        have = set(items[users == u].tolist())
        listing = [i for i in range(40) if i not in have]
        ranks = torch.arange(len(listing))
        got = positives.nth_negative(torch.full_like(ranks, u), ranks)
        assert got.tolist() == listing


def test_negatives_are_uniform_over_the_non_positives():
    # user 0 has 3 of 10 items: each of the other 7 comes up 1/7 of the time
    positives = PositiveSet(torch.zeros(3, dtype=torch.long), torch.tensor([0, 4, 9]), 10)
    g = torch.Generator().manual_seed(0)
    draws = positives.sample(torch.zeros(70_000, dtype=torch.long), 1, generator=g)
    counts = torch.bincount(draws.flatten(), minlength=10)
    assert counts[[0, 4, 9]].sum() == 0
    expected = 70_000 / 7
    chi2 = float(((counts[counts > 0] - expected) ** 2 / expected).sum())
    assert chi2 < 22.5  # 6 degrees of freedom, p = 0.001


def test_distinct_sampling_draws_different_items_per_row():
    positives = PositiveSet(torch.tensor([0, 0]), torch.tensor([0, 1]), num_items=12)
    g = torch.Generator().manual_seed(0)
    draws = positives.sample(torch.zeros(2000, dtype=torch.long), 10, generator=g, distinct=True)
    assert (draws.sort(dim=1).values.diff(dim=1) > 0).all()  # 10 different items per row
    assert (draws >= 2).all()  # none of the positives 0 and 1
    # uniform: each of the 10 non-positives is in every row
    assert torch.equal(draws.sort(dim=1).values[0], torch.arange(2, 12))
    with pytest.raises(ValueError, match="fewer than the 11 to sample"):
        positives.sample(torch.tensor([0]), 11, distinct=True)


def test_sampled_ranking_candidates_are_distinct(make_cfg):
    """The NCF protocol ranks each held-out item among 99 *different* negatives."""
    dm = _implicit_dm(make_cfg, "data.split.kind=leave_one_out", "data.ranking=sampled")
    for batch in dm.test_dataloader()[1]:
        candidates = batch.items.sort(dim=1).values
        assert (candidates.diff(dim=1) > 0).all(), "an item repeats among a query's candidates"
        users = batch.users.repeat_interleave(candidates.shape[1] - 1)
        assert not dm.positives.contains(users, batch.items[:, 1:].flatten()).any()


def test_bpr_loss_by_hand():
    # 2 positives with 2 negatives each: pairs (2-1), (2-0), (0-1), (0-(-1))
    logits = torch.tensor([2.0, 0.0, 1.0, 0.0, 1.0, -1.0])
    diffs = [1.0, 2.0, -1.0, 1.0]
    expected = sum(math.log1p(math.exp(-d)) for d in diffs) / 4
    assert bpr_loss(logits, 2).item() == pytest.approx(expected, rel=1e-6)
    # the layout is the batch's (`Batch.num_negatives`): plain rows, or a size that is not it
    for num_negatives in (0, 3):
        with pytest.raises(ValueError, match="data.feedback=implicit"):
            bpr_loss(logits, num_negatives)


@pytest.mark.parametrize("model", ["ncf", "hybrid", "dlrm"])
@pytest.mark.parametrize("loss", ["bce", "bpr"])
def test_implicit_training_runs(make_cfg, model, loss):
    metrics = run(
        make_cfg(
            "data=movielens",
            "data.feedback=implicit",
            f"model={model}",
            f"model.loss={loss}",
            "debug=fdr",
        )
    )
    # a smoke run of one batch each; learning is tested by test_bpr_learns_on_ml100k
    for name in ("train/loss", "test/auroc", *(["test/logloss"] if loss == "bce" else [])):
        assert math.isfinite(metrics[name]), name


BCE_FIGURES = ("val/loss", "test/logloss", "val/accuracy", "test/accuracy")


def _evaluation_figures(trainer, module, dm) -> dict[str, float]:
    """What validation, the test and the popularity baseline beside it report (timings
    left out)."""
    trainer.validate(module, datamodule=dm, verbose=False)
    figures = {k: float(v) for k, v in trainer.callback_metrics.items()}
    figures.update(evaluate_with_baseline(trainer, module, dm, None))
    return {k: v for k, v in figures.items() if not k.endswith("users_per_sec")}


@pytest.mark.slow
def test_bpr_reports_only_what_its_loss_defines(make_cfg):
    """BPR fixes the differences between a user's logits, not their offset: every figure a BPR
    run reports is the same after the head's bias moves by -2, and none of them is a binary
    cross-entropy figure (logloss, accuracy, val/loss), neither the model's nor the popularity
    baseline's beside it."""
    cfg = make_cfg(
        "data=movielens",
        "data.variant=100k",
        "data.feedback=implicit",
        "data.ranking=full",
        "model.loss=bpr",
        "model.optimizer.lr=0.02",  # logits apart by more than float32 rounding near -2
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=10",
        "+trainer.limit_val_batches=2",
        "+trainer.limit_test_batches=2",
    )
    dm, module, trainer = build(cfg)
    trainer.fit(module, datamodule=dm)
    assert math.isfinite(trainer.callback_metrics["train/loss"])  # the BPR loss
    before = _evaluation_figures(trainer, module, dm)
    with torch.no_grad():
        module.net.head.bias -= 2.0
    after = _evaluation_figures(trainer, module, dm)

    reported = {k.removeprefix("popularity/") for k in before}
    shown = {"val/auroc", "val/ndcg@10", "test/auroc", "test/ndcg@10", "test/diversity@10"}
    assert shown <= reported
    assert not reported & set(BCE_FIGURES)
    assert after == pytest.approx(before, rel=1e-5)


def test_bpr_learns_on_ml100k(make_cfg):
    metrics = run(
        make_cfg(
            "data=movielens",
            "data.feedback=implicit",
            "model=ncf",
            "model.loss=bpr",
            "trainer.max_epochs=2",
        )
    )
    print(
        f"implicit ml-100k NeuMF+BPR test AUROC {metrics['test/auroc']:.4f}, "
        f"popularity {metrics['popularity/test/auroc']:.4f}"
    )
    assert metrics["test/auroc"] > metrics["popularity/test/auroc"]
