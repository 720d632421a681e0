"""Checkpoints written by earlier versions still load, whatever has moved or been renamed since;
a checkpoint that names a class from outside the platform does not.

The checkpoints were written by ``train.py`` on ml-100k with the default data settings, 5
training steps:

- ``main-c8cca92-neumf-ml100k.ckpt``: NeuMF at c8cca92, ``model.gmf_dim=4 model.mlp_dim=4
  model.mlp_layers=[8,4]``;
- ``main-c8cca92-dlrm-ml100k-sharded.ckpt/``: a sharded checkpoint folder of ``trainer=torchrec
  model=dlrm model.embedding_dim=4 model.dense_arch_layers=[8,4] model.over_arch_layers=[8]``
  (2 CPU processes) at c8cca92;
- ``main-4528d44-mf-ml100k.ckpt``: ``model=ncf model.variant=mf model.gmf_dim=4`` at 4528d44,
  when matrix factorisation was a variant of NeuMF (today `recsys.models.MF`).

Beside each, a ``.json`` holds what that version's `Recommender` answered from it (pair logits,
user 1's top 5).

``main-4528d44-ncf-outputs.pt`` holds what NeuMF computed at 4528d44, before its towers became
modules of their own, for every variant (``mf`` included) with dense and row-sparse gradients,
on the CPU path and with ``host_reads_are_free`` off: with ``torch.manual_seed(0)``, the
weights it was built with and the next ``torch.rand(3)``; then, after its weights were drawn
anew, the logits of a batch and the gradients of their weighted sum, the ``embedding_l2``
penalty and its gradients, and (CPU, dense) the catalogue scores and item embeddings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import get_class

from recsys.checkpoint import RENAMED, RefusedCheckpoint, check_classes
from recsys.data import FeatureSpec
from recsys.data.store import FeatureStore
from recsys.evaluate import run as evaluate
from recsys.lit.module import RecommenderModule
from recsys.models import MF, NeuMF, common, mf, ncf
from recsys.models.ncf import upgrade_hparams
from recsys.recommender import Recommender
from recsys.runs import load_checkpoint
from recsys.scoring import CatalogueScorer
from tests.conftest import compose_cfg

FIXTURES = Path(__file__).resolve().parent / "fixtures"
NEUMF = FIXTURES / "main-c8cca92-neumf-ml100k.ckpt"
SHARDED_DLRM = FIXTURES / "main-c8cca92-dlrm-ml100k-sharded.ckpt"
MF_AS_NEUMF = FIXTURES / "main-4528d44-mf-ml100k.ckpt"
NCF_OUTPUTS = FIXTURES / "main-4528d44-ncf-outputs.pt"
CHECKPOINTS = [NEUMF, SHARDED_DLRM, MF_AS_NEUMF]
CHECKPOINT_IDS = ["neumf", "sharded-dlrm", "mf-as-neumf"]


def _current_names(state: dict, net: torch.nn.Module) -> dict:
    """A state_dict of the module with the network's names of earlier versions renamed."""
    legacy = mf.LEGACY_NAMES if isinstance(net, MF) else ncf.LEGACY_NAMES
    return common.rename_keys(dict(state), legacy, prefix="net.")


@pytest.mark.parametrize("ckpt", CHECKPOINTS, ids=CHECKPOINT_IDS)
def test_a_checkpoint_of_main_answers_as_it_did(ckpt, data_dir, cache_dir, tmp_path):
    cfg = compose_cfg("serve", data_dir, cache_dir, tmp_path, f"ckpt_path={ckpt}")
    rec = Recommender.from_config(cfg)
    expected = json.loads(ckpt.with_suffix(".json").read_text())
    users, items = zip(*expected["pairs"], strict=True)
    logits = rec.score(rec.user_codes(list(users)), rec.item_codes(list(items)))
    np.testing.assert_allclose(logits, expected["logits"], rtol=1e-5)
    top, _ = rec.recommend(rec.user_codes(["1"]), 5)
    assert [str(rec.item_index[c]) for c in top[0]] == expected["top5_user_1"]
    if ckpt.is_file():
        loaded = rec.model.state_dict()
        written = torch.load(ckpt, weights_only=True)["state_dict"]
        renamed = _current_names(written, rec.model.net)
        assert set(renamed) == set(loaded)
        for name, weights in renamed.items():
            torch.testing.assert_close(loaded[name], weights, msg=name)


def test_an_mf_checkpoint_of_neumf_loads_as_mf(data_dir, cache_dir, tmp_path):
    """NeuMF's ``variant=mf`` of 4528d44 is `MF` now: the module is built as one, with the
    hyperparameters it takes, and a checkpoint of it would be written so."""
    cfg = compose_cfg("serve", data_dir, cache_dir, tmp_path, f"ckpt_path={MF_AS_NEUMF}")
    model = Recommender.from_config(cfg).model
    assert isinstance(model.net, MF) and model.net.user_bias is not None
    assert model.hparams.net == "recsys.models.MF" and model.hparams.embedding_dim == 4
    assert "variant" not in model.hparams and "gmf_dim" not in model.hparams


@pytest.mark.parametrize("ckpt", CHECKPOINTS, ids=CHECKPOINT_IDS)
def test_a_checkpoint_of_main_evaluates(ckpt, data_dir, cache_dir, tmp_path):
    overrides = [f"ckpt_path={ckpt}", "trainer.accelerator=cpu", "latency_repeats=5"]
    metrics = evaluate(compose_cfg("evaluate", data_dir, cache_dir, tmp_path, *overrides))
    assert 0.0 < metrics["test/auroc"] < 1.0
    assert "popularity/test/auroc" in metrics


def _rewritten(tmp_path, change) -> Path:
    """The NeuMF fixture with ``change(checkpoint)`` applied, saved in ``tmp_path``."""
    checkpoint = torch.load(NEUMF, weights_only=True)
    change(checkpoint)
    path = tmp_path / "rewritten.ckpt"
    torch.save(checkpoint, path)
    return path


def _set_data_class(name):
    def change(checkpoint):
        checkpoint["MovieLensDataModule"]["data_class"] = name

    return change


@pytest.mark.parametrize(
    "change",
    [
        lambda c: c["hyper_parameters"].update(net="subprocess.Popen"),
        lambda c: c["hyper_parameters"].update(net="this.Popen"),  # `this` prints on import
        lambda c: c["hyper_parameters"].update(net="recsys.models.ncf.torch.load"),
        lambda c: c["hyper_parameters"]["optimizer"].update(_target_="os.system"),
        lambda c: c["hyper_parameters"].update(lr_scheduler={"_target_": "builtins.exec"}),
        lambda c: c["hyper_parameters"].update(pretrained={"_target_": "recsys.models.NeuMF"}),
        _set_data_class("subprocess.Popen"),
        _set_data_class("recsys.models.NeuMF"),
    ],
    ids=[
        "net",
        "net-not-imported",
        "net-attribute-chain",
        "optimizer",
        "lr_scheduler",
        "other-target",
        "data_class",
        "data_class-of-other-kind",
    ],
)
def test_a_checkpoint_naming_a_class_from_elsewhere_is_refused_before_import(
    change, data_dir, cache_dir, tmp_path
):
    path = _rewritten(tmp_path, change)
    cfg = compose_cfg("evaluate", data_dir, cache_dir, tmp_path, f"ckpt_path={path}")
    with pytest.raises(RefusedCheckpoint, match="recsys builds only its own classes"):
        load_checkpoint(cfg)
    assert "this" not in sys.modules


def test_trusted_and_renamed_classes_are_accepted(data_dir, cache_dir, tmp_path, monkeypatch):
    path = _rewritten(tmp_path, lambda c: c["hyper_parameters"].update(net="recsys.NeuMFv0"))
    monkeypatch.setitem(RENAMED, "recsys.NeuMFv0", "recsys.models.NeuMF")  # an earlier name
    _, model = load_checkpoint(
        compose_cfg("evaluate", data_dir, cache_dir, tmp_path, f"ckpt_path={path}")
    )
    assert type(model.net).__name__ == "NeuMF"
    checkpoint = {"hyper_parameters": {"net": "collections.OrderedDict"}}
    check_classes(checkpoint, "a.ckpt", trusted=["collections.OrderedDict"])
    with pytest.raises(RefusedCheckpoint, match=r"trusted_classes=\[collections.OrderedDict\]"):
        check_classes(checkpoint, "a.ckpt")


SPEC = FeatureSpec.of_ids(num_users=30, num_items=50)
SIZES = {"gmf_dim": 4, "mlp_dim": 6, "mlp_layers": [8, 4], "dropout": 0.0, "alpha": 0.5}
VARIANTS = {  # the fixture's cases: NeuMF's keyword arguments at 4528d44
    "gmf": {"variant": "gmf"},
    "mlp": {"variant": "mlp"},
    "neumf": {"variant": "neumf"},
    "mf": {"variant": "mf", "biases": True},
    "mf_no_biases": {"variant": "mf", "biases": False},
}


def _dense(grad: torch.Tensor) -> torch.Tensor:
    return grad.coalesce().to_dense() if grad.is_sparse else grad


def _assert_grads(net: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    grads = {n: _dense(p.grad) for n, p in net.named_parameters() if p.grad is not None}
    assert set(grads) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("path", ["cpu", "device"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("case", list(VARIANTS))
def test_the_networks_compute_what_neumf_of_main_4528d44_did(case, sparse, path, monkeypatch):
    """NeuMF (as GMF and MLP towers and a head) and MF against NeuMF of 4528d44 in every
    variant, built from its keyword arguments as checkpoints are (`upgrade_hparams`): the same
    weights from the same seed (and the same random stream after), its state_dicts load,
    and the same logits, gradients, L2 penalty, catalogue scores and item vectors."""
    if path == "device":
        monkeypatch.setattr(common, "host_reads_are_free", lambda t: False)
    ref = torch.load(NCF_OUTPUTS, weights_only=True)
    key = f"{case}/{'sparse' if sparse else 'dense'}/{path}"
    kwargs = {**SIZES, **VARIANTS[case], "pretrained": None, "sparse_grad": sparse}
    net_name, kwargs = upgrade_hparams("recsys.models.NeuMF", kwargs)
    assert (net_name == "recsys.models.MF") == case.startswith("mf")
    torch.manual_seed(0)
    net = get_class(net_name)(SPEC, **kwargs)
    assert torch.equal(torch.rand(3), ref[f"{case}/after_init"])
    built = net.state_dict()
    net.load_state_dict(ref[f"{case}/init"])  # the names of 4528d44
    for name, value in net.state_dict().items():
        assert torch.equal(value, built[name]), name
    net.load_state_dict(ref[f"{case}/state"])
    legacy = mf.LEGACY_NAMES if isinstance(net, MF) else ncf.LEGACY_NAMES

    batch = FeatureStore(SPEC, None, None).make_batch(ref["users"], ref["items"])
    logits = net(batch)
    (logits * ref["weights"]).sum().backward()
    torch.testing.assert_close(logits.detach(), ref[f"{key}/logits"], rtol=0, atol=1e-6)
    _assert_grads(net, common.rename_keys(dict(ref[f"{key}/grads"]), legacy))

    net.zero_grad()
    penalty = net.embedding_l2(batch)
    penalty.backward()
    torch.testing.assert_close(penalty.detach(), ref[f"{key}/l2"], rtol=0, atol=1e-6)
    _assert_grads(net, common.rename_keys(dict(ref[f"{key}/l2_grads"]), legacy))

    if path == "cpu" and not sparse:
        scorer = CatalogueScorer(net, FeatureStore(SPEC, None, None), SPEC.num_items)
        scores = scorer.scores(torch.arange(SPEC.num_users))
        torch.testing.assert_close(scores, ref[f"{case}/catalogue"], rtol=0, atol=1e-6)
        vectors = net.item_embeddings().detach()
        torch.testing.assert_close(vectors, ref[f"{case}/item_embeddings"], rtol=0, atol=0)


def test_neumf_points_variant_mf_at_the_mf_model():
    with pytest.raises(ValueError, match="model.variant=mf: .* use model=mf"):
        NeuMF(SPEC, variant="mf")


def test_load_from_checkpoint_refuses_a_class_from_elsewhere(tmp_path):
    path = _rewritten(tmp_path, lambda c: c["hyper_parameters"].update(net="subprocess.Popen"))
    with pytest.raises(RefusedCheckpoint, match="recsys builds only its own classes"):
        RecommenderModule.load_from_checkpoint(path)
    assert type(RecommenderModule.load_from_checkpoint(NEUMF).net) is NeuMF
