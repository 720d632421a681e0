"""Every model on every dataset, and the model-specific options."""

from __future__ import annotations

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from recsys import scoring
from recsys.data import FeatureSpec
from recsys.data.negatives import PositiveSet
from recsys.data.spec import DenseFeature, SparseFeature
from recsys.data.store import FeatureStore, RowFeatures
from recsys.errors import InputError
from recsys.lit.module import embedding_parameters
from recsys.lit.optim import CombinedOptimizer, RowSparseAdagrad, RowSparseAdam
from recsys.models import DLRM, EASE, MF, Hybrid, LogisticRegression, NeuMF, Popularity
from recsys.models.ncf import VARIANTS
from recsys.models.protocols import (
    EmbeddingPenalty,
    Factorised,
    ItemEmbeddings,
    Pretrainable,
    SparseGrad,
)
from recsys.scoring import CatalogueScorer
from recsys.train import run

MODELS = ["ncf", "hybrid", "dlrm", "logreg"]


@pytest.fixture(scope="session")
def interactions_csv(tmp_path_factory):
    """A small interaction file in the brief-004 layout (userId,itemId,target)."""
    rng = np.random.default_rng(0)
    n = 3000
    df = pd.DataFrame(
        {
            "userId": rng.integers(0, 100, n),
            "itemId": rng.integers(0, 80, n),
            "target": rng.integers(0, 2, n),
        }
    ).drop_duplicates(["userId", "itemId"])
    path = tmp_path_factory.mktemp("csv") / "train.csv"
    df.to_csv(path, index=False)
    return path


DATASETS = {
    "movielens": ["data=movielens", "data.variant=100k"],
    "synthetic": ["data=synthetic"],
    "books": ["data=books"],
    "csv": ["data=csv"],
}


@pytest.mark.parametrize("data", list(DATASETS))
@pytest.mark.parametrize("model", MODELS)
def test_every_model_on_every_dataset(make_cfg, interactions_csv, model, data):
    overrides = [*DATASETS[data], f"model={model}", "debug=fdr"]
    if data == "csv":
        overrides.append(f"data.path={interactions_csv}")
    metrics = run(make_cfg(*overrides))
    # a smoke run of one batch each: every stage ran and produced numbers (how well each model
    # learns is tested on full runs in test_train.py)
    for name in ("train/loss", "test/logloss", "test/auroc"):
        assert np.isfinite(metrics[name]), name


def _net_and_batch(make_cfg, *overrides):
    cfg = make_cfg("data=movielens", "data.variant=100k", "data.batch_size=64", *overrides)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup()
    module = instantiate(cfg.model, spec=dm.spec.to_dict(), _recursive_=False)
    return module, next(iter(dm.train_dataloader())), dm


def test_logreg_is_a_weight_per_code_plus_dense_plus_bias(make_cfg):
    module, batch, dm = _net_and_batch(make_cfg, "model=logreg")
    net = module.net
    assert isinstance(net, LogisticRegression)
    tables = net.weights.embedding_bags
    assert sorted(tables) == sorted(f"t_{f.name}" for f in dm.spec.sparse)  # every feature
    for f in dm.spec.sparse:
        assert tables[f"t_{f.name}"].weight.shape == (f.num_embeddings, 1)
    assert net.dense.in_features == dm.spec.num_dense > 0
    torch.manual_seed(0)
    for p in net.parameters():
        torch.nn.init.normal_(p)
    # the logit by hand: the bias, each feature's codes' weights summed, the dense layer
    kjt = batch.sparse_features
    expected = net.bias + net.dense(batch.dense_features).squeeze(1)
    for f in dm.spec.sparse:
        jt = kjt[f.name]
        weights = tables[f"t_{f.name}"].weight[jt.values(), 0]
        expected = expected + torch.segment_reduce(weights, "sum", lengths=jt.lengths())
    torch.testing.assert_close(net(batch), expected)


def test_logreg_beats_chance_on_ml100k(make_cfg):
    metrics = run(
        make_cfg("data=movielens", "data.variant=100k", "trainer.max_epochs=2", "model=logreg")
    )
    print(
        f"ml-100k logreg test AUROC {metrics['test/auroc']:.4f}, "
        f"popularity {metrics['popularity/test/auroc']:.4f}"
    )
    assert metrics["test/auroc"] > max(0.65, metrics["popularity/test/auroc"] + 0.05)


def test_dlrm_tables_cover_every_sparse_feature(make_cfg):
    module, batch, dm = _net_and_batch(
        make_cfg, "model=dlrm", "model.feature_pooling={genres: mean}"
    )
    ebc = module.net.dlrm.sparse_arch.embedding_bag_collection
    configs = {c.feature_names[0]: c for c in ebc.embedding_bag_configs()}
    assert list(configs) == dm.spec.sparse_names
    for f in dm.spec.sparse:
        assert configs[f.name].num_embeddings == f.num_embeddings
    assert configs["genres"].pooling.name == "MEAN" and configs["gender"].pooling.name == "SUM"
    assert module(batch).shape == (64,)


def test_dlrm_dcn_interaction(make_cfg):
    module, batch, _ = _net_and_batch(make_cfg, "model=dlrm", "model.interaction=dcn")
    assert type(module.net.dlrm).__name__ == "DLRM_DCN"
    assert module(batch).shape == (64,)


def test_dlrm_rejects_bad_options(make_cfg):
    with pytest.raises(InstantiationException, match="must end in model.embedding_dim"):
        _net_and_batch(make_cfg, "model=dlrm", "model.dense_arch_layers=[64,16]")
    with pytest.raises(InstantiationException, match="unknown features"):
        _net_and_batch(make_cfg, "model=dlrm", "model.feature_pooling={colour: mean}")


def test_dlrm_sparse_and_dense_optimizers(make_cfg):
    module, _, _ = _net_and_batch(make_cfg, "model=dlrm")
    optimizer = module.configure_optimizers()  # one optimizer for Lightning: both parts
    assert isinstance(optimizer, CombinedOptimizer)
    sparse_opt, dense_opt = optimizer.parts["sparse"], optimizer.parts["dense"]
    assert isinstance(sparse_opt, torch.optim.Adagrad) and isinstance(dense_opt, torch.optim.Adam)
    sparse = {id(p) for g in sparse_opt.param_groups for p in g["params"]}
    dense = {id(p) for g in dense_opt.param_groups for p in g["params"]}
    assert sparse == {id(p) for p in embedding_parameters(module.net)}
    assert not sparse & dense and sparse | dense == {id(p) for p in module.parameters()}


ROW_SPARSE_ADAM = (
    "model.sparse_optimizer={_target_: recsys.lit.optim.RowSparseAdam, _partial_: true, lr: 0.01}"
)
ROW_SPARSE_ADAGRAD = (
    "model.sparse_optimizer="
    "{_target_: recsys.lit.optim.RowSparseAdagrad, _partial_: true, lr: 0.02}"
)


@pytest.mark.parametrize(
    ("model", "table", "ids"),
    [
        (["model=ncf", "model.variant=neumf", ROW_SPARSE_ADAM], "mlp.user", "user_id"),
        (["model=mf", ROW_SPARSE_ADAM], "item_bias", "item_id"),
        (
            ["model=dlrm"],
            "dlrm.sparse_arch.embedding_bag_collection.embedding_bags.t_item_id",
            "item_id",
        ),
        (
            ["model=dlrm", ROW_SPARSE_ADAGRAD],
            "dlrm.sparse_arch.embedding_bag_collection.embedding_bags.t_item_id",
            "item_id",
        ),
        (["model=hybrid", ROW_SPARSE_ADAM], "item", "item_id"),
        (
            ["model=hybrid", "model.use_side_features=true", ROW_SPARSE_ADAM],
            "side.embedding_bags.t_genres",
            "genres",
        ),
    ],
)
def test_sparse_grad_updates_only_the_rows_of_the_batch(make_cfg, model, table, ids):
    """model.sparse_grad=true: row-sparse table gradients, stepped by the sparse optimizer;
    a table's rows that the batch does not hold keep their values, the others move."""
    module, batch, _ = _net_and_batch(make_cfg, *model, "model.sparse_grad=true")
    weight = module.net.get_submodule(table).weight
    before = weight.detach().clone()
    optimizer = module.configure_optimizers()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(module(batch), batch.labels)
    loss.backward()
    assert weight.grad.is_sparse
    optimizer.step()
    moved = (weight.detach() != before).any(1)
    assert torch.equal(moved.nonzero()[:, 0], batch.ids(ids).unique())


def test_hybrid_sparse_gradients_are_its_dense_gradients(make_cfg):
    """Hybrid with model.sparse_grad=true: the same function, and each table's row-sparse
    gradient, summed per row, is the dense one."""
    side = ["model=hybrid", "model.use_side_features=true"]
    dense, batch, _ = _net_and_batch(make_cfg, *side)
    sparse, _, _ = _net_and_batch(make_cfg, *side, "model.sparse_grad=true")
    sparse.load_state_dict(dense.state_dict())
    torch.testing.assert_close(sparse(batch), dense(batch))
    for module in (dense, sparse):
        F.binary_cross_entropy_with_logits(module(batch), batch.labels).backward()
    tables = {id(p) for p in embedding_parameters(dense.net)}
    assert len(tables) == 2 + len(dense.net.user_side) + len(dense.net.item_side)
    for (name, d), s in zip(dense.net.named_parameters(), sparse.net.parameters(), strict=True):
        assert s.grad.is_sparse == (id(d) in tables), name
        got = s.grad.to_dense() if s.grad.is_sparse else s.grad
        torch.testing.assert_close(got, d.grad, msg=name)
    assert dense.net.user.weight.grad.abs().sum() > 0


def test_sparse_grad_needs_a_sparse_optimizer(make_cfg):
    module, _, _ = _net_and_batch(make_cfg, "model=ncf", "model.sparse_grad=true")
    with pytest.raises(ValueError, match="model.sparse_grad=true .* set model.sparse_optimizer"):
        module.configure_optimizers()


def test_hybrid_side_features_change_the_score(make_cfg):
    module, batch, dm = _net_and_batch(make_cfg, "model=hybrid", "model.use_side_features=true")
    torch.manual_seed(0)
    for p in module.parameters():  # make the side tables matter
        torch.nn.init.normal_(p, std=0.5)
    users, items = batch.ids("user_id")[:2], batch.ids("item_id")[:2]
    a = dm.data.features.make_batch(users, items)
    b = dm.data.features.make_batch(users, items)
    b.dense_features = b.dense_features + 1.0
    assert not torch.allclose(module(a), module(b))
    plain, _, _ = _net_and_batch(make_cfg, "model=hybrid")
    assert plain.net.side is None and plain.net.num_dense == 0


def test_hybrid_is_dot_plus_mlp(make_cfg):
    """Properties, not a copy of forward: without the MLP the score is the dot product of the
    user and item vectors (bilinear: doubling the user vectors doubles it); the MLP adds a
    term that a dot product cannot make (nonzero when the item vectors are zero)."""
    module, batch, _ = _net_and_batch(make_cfg, "model=hybrid")
    net = module.net
    with torch.no_grad():
        full = module(batch)
        head_weight = net.head.weight.clone()
        net.head.weight.zero_()
        net.head.bias.zero_()
        dot = module(batch)
        net.user.weight.mul_(2)
        assert torch.allclose(module(batch), 2 * dot, atol=1e-6) and dot.abs().sum() > 0
        net.user.weight.div_(2)
        net.head.weight.copy_(head_weight)
        assert not torch.allclose(full, dot)  # the MLP term
        net.item.weight.zero_()  # no dot term left: only the MLP speaks
        assert module(batch).abs().sum() > 0


SPEC_IDS = FeatureSpec.of_ids(num_users=7, num_items=40)


def table_weights(net: torch.nn.Module) -> set[str]:
    """The names of the embedding tables' weights."""
    return {f"{n}.weight" for n, m in net.named_modules() if isinstance(m, torch.nn.Embedding)}


@pytest.mark.parametrize(
    "net",
    [
        *(NeuMF(SPEC_IDS, variant=v, gmf_dim=4, mlp_dim=6, mlp_layers=[8, 4]) for v in VARIANTS),
        MF(SPEC_IDS, embedding_dim=4),
        MF(SPEC_IDS, embedding_dim=4, biases=False),
        Hybrid(SPEC_IDS, embedding_dim=5, mlp_layers=[8, 3]),
    ],
    ids=[*VARIANTS, "mf", "mf-no-biases", "hybrid"],
)
def test_catalogue_scoring_equals_the_forward(net, monkeypatch):
    """The factorised fast path (`CatalogueScorer`) against one forward per (user, item)."""
    monkeypatch.setattr(scoring, "FACTORISED_FLOATS", 100)  # several chunks
    torch.manual_seed(0)
    for p in net.parameters():
        torch.nn.init.normal_(p)
    features = FeatureStore(SPEC_IDS, None, None)
    scorer = CatalogueScorer(net, features, SPEC_IDS.num_items, max_pairs=100)
    users = torch.arange(SPEC_IDS.num_users)
    assert scorer.factorised and scorer.chunk_users < len(users)  # several chunks
    expected = _all_pair_logits(net, features, users)
    torch.testing.assert_close(scorer.scores(users), expected, atol=1e-4, rtol=1e-4)


def _all_pair_logits(net, features: FeatureStore, users: torch.Tensor) -> torch.Tensor:
    """Logits [U, num_items] by one plain forward over every (user, item) pair."""
    flat = features.make_batch(
        users.repeat_interleave(SPEC_IDS.num_items),
        torch.arange(SPEC_IDS.num_items).repeat(len(users)),
    )
    with torch.no_grad():
        return net(flat).view(len(users), -1)


def test_top_k_over_several_blocks_is_the_best_unseen_items(monkeypatch):
    """`CatalogueScorer.top_k` masks known items a block of users at a time and scores each
    block in chunks: with blocks of 3 and chunks of 2 users, every user's top-k is still the
    k highest logits of the plain forward among the items the user has not seen."""
    monkeypatch.setattr(scoring, "FACTORISED_FLOATS", 2 * 40 * 8)  # chunks of 2 users
    monkeypatch.setattr(scoring, "BLOCK_FLOATS", 3 * 40)  # blocks of 3
    torch.manual_seed(0)
    net = NeuMF(SPEC_IDS, variant="neumf", gmf_dim=4, mlp_dim=6, mlp_layers=[8, 4])
    seen_users = torch.randint(SPEC_IDS.num_users, (60,))
    seen = PositiveSet(seen_users, torch.randint(SPEC_IDS.num_items, (60,)), SPEC_IDS.num_items)
    features = FeatureStore(SPEC_IDS, None, None)
    scorer = CatalogueScorer(net, features, SPEC_IDS.num_items)
    assert (scorer.chunk_users, scorer.block_users) == (2, 3)
    users = torch.arange(SPEC_IDS.num_users)
    top, logits = scorer.top_k(users, 5, exclude=seen)
    expected = _all_pair_logits(net, features, users).masked_fill(seen.mask(users), float("-inf"))
    best, _ = expected.topk(5, dim=1)
    torch.testing.assert_close(logits, best, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(expected.gather(1, top), best, atol=1e-5, rtol=1e-5)
    assert not seen.mask(users).gather(1, top).any()


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("variant", ["mlp", "neumf"])
def test_mlp_tower_equals_the_mlp_on_concatenated_embeddings(variant, sparse_grad):
    """`MLPTower` (the first layer once per distinct user and item) against the plain
    MLP over [p'_u; q'_i] per pair: the same logits and the same gradients, with repeated
    users and items as negative sampling makes them; with ``sparse_grad``, the tables'
    gradients are row-sparse over distinct rows in order, with the same values."""
    torch.manual_seed(0)
    net = NeuMF(
        SPEC_IDS, variant=variant, gmf_dim=4, mlp_dim=6, mlp_layers=[8, 4], sparse_grad=sparse_grad
    )
    users = torch.randint(SPEC_IDS.num_users, (40,)).repeat_interleave(5)
    items = torch.randint(SPEC_IDS.num_items, (200,))
    batch = FeatureStore(SPEC_IDS, None, None).make_batch(users, items)

    def plain() -> torch.Tensor:
        towers = [net.mlp.layers(torch.cat([net.mlp.user(users), net.mlp.item(items)], 1))]
        if variant == "neumf":
            towers.insert(0, net.gmf.user(users) * net.gmf.item(items))
        return net.head(torch.cat(towers, 1)).squeeze(1)

    grads = []
    for forward in (lambda: net(batch), plain):
        net.zero_grad()
        logits = forward()
        (logits * torch.linspace(-1, 1, len(logits))).sum().backward()
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
    (ours, our_grads), (expected, expected_grads) = grads
    torch.testing.assert_close(ours, expected)
    for name, grad in expected_grads.items():
        got = our_grads[name]
        if sparse_grad and name in table_weights(net):
            rows = got._indices()[0]
            assert got.is_sparse and bool((rows[1:] > rows[:-1]).all()), name  # distinct
            got, grad = got.to_dense(), grad.coalesce().to_dense()
        torch.testing.assert_close(got, grad, msg=name)


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("variant", [*VARIANTS, "mf"])
def test_embedding_l2_is_the_mean_squared_norm_of_each_pairs_rows(variant, sparse_grad):
    """`NeuMF.embedding_l2` and `MF.embedding_l2` (once per distinct id, weighted by its
    count) against the sum over pairs of the squared norms of every row each pair looks up,
    divided by the pairs: the same value and the same gradients, with repeated users and
    items."""
    torch.manual_seed(0)
    if variant == "mf":
        net = MF(SPEC_IDS, embedding_dim=4, sparse_grad=sparse_grad)
        with torch.no_grad():  # zeros at the start: give them values to penalise
            net.user_bias.weight.normal_()
            net.item_bias.weight.normal_()
    else:
        net = NeuMF(
            SPEC_IDS,
            variant=variant,
            gmf_dim=4,
            mlp_dim=6,
            mlp_layers=[8, 4],
            sparse_grad=sparse_grad,
        )
    users = torch.randint(SPEC_IDS.num_users, (30,)).repeat_interleave(3)
    items = torch.randint(SPEC_IDS.num_items, (90,))
    batch = FeatureStore(SPEC_IDS, None, None).make_batch(users, items)

    def per_pair() -> torch.Tensor:
        total = 0.0
        for name, table in net.named_modules():
            if isinstance(table, torch.nn.Embedding):
                ids = users if "user" in name else items
                total = total + table.weight[ids].square().sum()
        return total / len(users)

    values, grads = [], []
    for penalty in (lambda: net.embedding_l2(batch), per_pair):
        net.zero_grad()
        value = penalty()
        value.backward()
        values.append(value.detach())
        grads.append({n: p.grad for n, p in net.named_parameters() if p.grad is not None})
    torch.testing.assert_close(values[0], values[1])
    tables = {n for n, m in net.named_modules() if isinstance(m, torch.nn.Embedding)}
    assert set(grads[0]) == set(grads[1]) == {f"{t}.weight" for t in tables}
    for name, expected in grads[1].items():
        got = grads[0][name]
        if sparse_grad:  # the per-pair sum indexes the weights: a dense gradient
            assert got.is_sparse, name
            got = got.to_dense()
        torch.testing.assert_close(got, expected, msg=name)


def test_model_l2_adds_the_penalty_to_the_training_loss(make_cfg):
    """model.l2: the training step returns the loss plus l2 times the mean squared norm of
    the rows each pair looks up (counted here per pair), and 0 adds nothing."""
    for l2 in (0.0, 0.5):
        module, batch, _ = _net_and_batch(make_cfg, "model=mf", f"model.l2={l2}")
        module.trainer = L.Trainer(logger=False, enable_checkpointing=False, max_epochs=1)
        objective = module.training_step(batch, 0)
        net, users, items = module.net, batch.ids("user_id"), batch.ids("item_id")
        rows = [net.user.weight[users], net.item.weight[items]]
        rows += [net.user_bias.weight[users], net.item_bias.weight[items]]
        penalty = sum(r.square().sum() for r in rows) / len(batch)
        assert penalty > 1e-4  # the two cases differ by more than the tolerance
        bce = F.binary_cross_entropy_with_logits(module(batch), batch.labels)
        torch.testing.assert_close(objective, bce + l2 * penalty)


def test_model_l2_needs_a_network_with_the_penalty(make_cfg):
    with pytest.raises(
        InstantiationException, match=r"model.l2=0.1: recsys.models.DLRM has no embedding_l2"
    ):
        _net_and_batch(make_cfg, "model=dlrm", "+model.l2=0.1")
    with pytest.raises(InstantiationException, match=r"model.l2=-1: .* must be >= 0"):
        _net_and_batch(make_cfg, "model=ncf", "model.l2=-1")


def test_row_sparse_adam_is_sparse_adam():
    """`RowSparseAdam` against torch.optim.SparseAdam on NeuMF's row-sparse gradients: the
    same weights and moments, to the bit, after steps whose batches repeat rows."""
    torch.manual_seed(0)
    nets = [NeuMF(SPEC_IDS, gmf_dim=4, mlp_dim=6, mlp_layers=[8, 4], sparse_grad=True)]
    nets.append(NeuMF(SPEC_IDS, gmf_dim=4, mlp_dim=6, mlp_layers=[8, 4], sparse_grad=True))
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [
        cls([p for n, p in net.named_parameters() if n in table_weights(net)], lr=0.01)
        for cls, net in zip((torch.optim.SparseAdam, RowSparseAdam), nets, strict=True)
    ]
    features = FeatureStore(SPEC_IDS, None, None)
    for _ in range(5):
        users = torch.randint(SPEC_IDS.num_users, (12,)).repeat_interleave(3)
        items = torch.randint(SPEC_IDS.num_items, (36,))
        batch = features.make_batch(users, items)
        for net, opt in zip(nets, opts, strict=True):
            opt.zero_grad()
            net(batch).square().sum().backward()
            opt.step()
    theirs = nets[0].state_dict()
    for name, ours in nets[1].state_dict().items():
        assert torch.equal(ours, theirs[name]), name
    for ours, theirs in zip(opts[1].state.values(), opts[0].state.values(), strict=True):
        assert ours["step"] == theirs["step"] == 5
        assert torch.equal(ours["exp_avg"], theirs["exp_avg"])
        assert torch.equal(ours["exp_avg_sq"], theirs["exp_avg_sq"])


@pytest.mark.parametrize("distinct", [True, False])
def test_row_sparse_adagrad_is_adagrad(distinct):
    """`RowSparseAdagrad` against torch.optim.Adagrad on the row-sparse gradients of
    ``nn.EmbeddingBag(sparse=True)`` tables (DLRM's), five steps with lr decay: to the bit when
    a step's rows are distinct; with repeated rows (one gradient row per lookup) the sums add in
    another order, so equal up to float rounding."""
    torch.manual_seed(0)
    tables = [torch.nn.EmbeddingBag(30, 4, mode="sum", sparse=True) for _ in range(2)]
    tables[1].load_state_dict(tables[0].state_dict())
    before = tables[0].weight.detach().clone()
    opts = [
        cls(table.parameters(), lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1)
        for cls, table in zip((torch.optim.Adagrad, RowSparseAdagrad), tables, strict=True)
    ]
    for _ in range(5):
        ids = torch.randperm(30)[:12] if distinct else torch.randint(30, (12,))
        offsets, weights = torch.tensor([0, 5]), torch.randn(2)
        for table, opt in zip(tables, opts, strict=True):
            opt.zero_grad()
            (table(ids, offsets).sum(1) * weights).sum().backward()
            opt.step()
    check = torch.equal if distinct else torch.allclose
    assert check(tables[1].weight, tables[0].weight)
    ours, theirs = (next(iter(opt.state.values())) for opt in opts[::-1])
    assert check(ours["sum"], theirs["sum"]) and ours["step"] == theirs["step"] == 5
    assert not torch.equal(tables[1].weight, before)  # the steps moved the table


def test_row_sparse_adagrad_refuses_what_torch_refuses():
    weight = torch.nn.Parameter(torch.zeros(4, 3))
    weight.grad = torch.ones(4, 3)
    with pytest.raises(RuntimeError, match="row-sparse gradients only"):
        RowSparseAdagrad([weight]).step()
    weight.grad = torch.ones(4, 3).to_sparse(1)
    with pytest.raises(RuntimeError, match="weight_decay"):
        RowSparseAdagrad([weight], weight_decay=0.1).step()


def test_row_sparse_adam_refuses_gradients_it_does_not_take():
    weight = torch.nn.Parameter(torch.zeros(4, 3))
    opt = RowSparseAdam([weight])
    weight.grad = torch.ones(4, 3)
    with pytest.raises(RuntimeError, match="row-sparse gradients only"):
        opt.step()
    weight.grad = torch.ones(4, 3).to_sparse()  # sparse in both dimensions
    with pytest.raises(RuntimeError, match="row-sparse gradients only"):
        opt.step()


ROWS_ONLY = FeatureSpec.of_rows(
    (SparseFeature("C1", "row", 5), SparseFeature("C2", "row", 3)), (DenseFeature("I1", "row"),)
)


@pytest.mark.parametrize(("net", "name"), [(NeuMF, "ncf"), (MF, "mf"), (Hybrid, "hybrid")])
def test_models_that_need_ids_refuse_data_without_them(net, name):
    with pytest.raises(InputError, match=rf"model={name} needs user and item ids.*model=dlrm"):
        net(ROWS_ONLY)


def test_models_of_every_feature_take_data_without_ids():
    row = RowFeatures(
        codes={"C1": torch.tensor([1, 4]), "C2": torch.tensor([0, 2])},
        lists={},
        dense=torch.tensor([[0.5], [-1.0]]),
    )
    batch = FeatureStore(ROWS_ONLY, None, None).make_batch(None, None, row=row)
    for net in (
        DLRM(ROWS_ONLY, embedding_dim=4, dense_arch_layers=[4], over_arch_layers=[4]),
        LogisticRegression(ROWS_ONLY),
    ):
        assert net(batch).shape == (2,)


def test_hybrid_reads_the_users_and_items_dense_features_not_the_rows():
    spec = FeatureSpec.of_ids(
        4,
        5,
        side=(SparseFeature("ctx", "row", 3),),
        dense=(DenseFeature("d_row", "row"),),
    )
    net = Hybrid(spec, embedding_dim=3, mlp_layers=[4], use_side_features=True)
    assert net.num_dense == 0 and net.mlp[0].in_features == 2 * 3
    assert net.side is None  # the row's sparse feature is no side feature of a user or item
    row = RowFeatures(codes={"ctx": torch.tensor([1, 2])}, lists={}, dense=torch.ones(2, 1))
    batch = FeatureStore(spec, None, None).make_batch(
        torch.tensor([0, 1]), torch.tensor([2, 3]), row=row
    )
    assert batch.dense_features.shape == (2, 1)  # d_row
    with torch.no_grad():
        before = net(batch)
        batch.dense_features += 10.0  # the row's dense column changes nothing
        torch.testing.assert_close(net(batch), before)


@pytest.mark.parametrize(
    ("net", "protocols"),
    [
        (
            NeuMF(SPEC_IDS, gmf_dim=4, mlp_dim=6, mlp_layers=[8, 4]),
            {Factorised, ItemEmbeddings, EmbeddingPenalty, SparseGrad, Pretrainable},
        ),
        (MF(SPEC_IDS, embedding_dim=4), {Factorised, ItemEmbeddings, EmbeddingPenalty, SparseGrad}),
        (
            Hybrid(SPEC_IDS, embedding_dim=4, mlp_layers=[4]),
            {Factorised, ItemEmbeddings, SparseGrad},
        ),
        (LogisticRegression(SPEC_IDS), {SparseGrad}),
        (EASE(SPEC_IDS), {Factorised}),
        (Popularity(SPEC_IDS), set()),
    ],
    ids=["neumf", "mf", "hybrid", "logreg", "ease", "popularity"],
)
def test_models_declare_what_they_can_do(net, protocols):
    """The typed protocols that the LightningModule, the scorer and the recommender test."""
    every = {Factorised, ItemEmbeddings, EmbeddingPenalty, SparseGrad, Pretrainable}
    assert {p for p in every if isinstance(net, p)} == protocols


def test_model_ncf_variant_mf_builds_mf(make_cfg):
    """The config of before MF was a model of its own still trains MF, saved as MF."""
    module, batch, _ = _net_and_batch(make_cfg, "model=ncf", "model.variant=mf")
    assert isinstance(module.net, MF) and module.hparams.net == "recsys.models.MF"
    assert module.hparams.embedding_dim == 32 and "mlp_layers" not in module.hparams
    assert module(batch).shape == (64,)
