"""One optimization path for every model: Lightning's automatic optimization, one optimizer
(sparse tables and dense layers combined), step counting, clipping, accumulation, schedules."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from recsys.lit.module import embedding_parameters
from recsys.lit.optim import cosine_with_warmup

MODELS = ["ncf", "hybrid", "dlrm"]
COSINE = (
    "model.lr_scheduler={_target_: torch.optim.lr_scheduler.CosineAnnealingLR,"
    " _partial_: true, T_max: 6}"
)


class Recorder(L.Callback):
    """Counts training batches and optimizer steps; records the learning rates before each
    step and the gradient norm before and after Lightning clips it."""

    def __init__(self):
        self.batches = 0
        self.lrs: list[list[float]] = []
        self.norms_before: list[float] = []
        self.norms_after: list[float] = []

    @staticmethod
    def _grad_norm(optimizer) -> float:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append([g["lr"] for g in optimizer.param_groups])
        self.norms_before.append(self._grad_norm(optimizer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # after the optimizer step the (clipped) gradients are still there: Lightning zeroes
        # them before the next backward pass
        if len(self.norms_after) < len(self.norms_before):
            self.norms_after.append(self._grad_norm(trainer.optimizers[0]))


def _fit(make_cfg, model: str, *overrides: str, **trainer_kwargs):
    cfg = make_cfg("data=movielens", "data.variant=100k", f"model={model}", *overrides)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    module = instantiate(cfg.model, spec=dm.spec.to_dict(), _recursive_=False)
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=dm)
    return trainer, module, recorder


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("model", MODELS)
def test_max_steps_counts_optimizer_steps(make_cfg, model, accumulate):
    trainer, _, rec = _fit(make_cfg, model, max_steps=4, accumulate_grad_batches=accumulate)
    assert len(trainer.optimizers) == 1
    assert trainer.global_step == 4 and len(rec.lrs) == 4
    assert rec.batches == 4 * accumulate  # one optimizer step per `accumulate` batches


@pytest.mark.parametrize("model", MODELS)
def test_gradient_clipping_clips_every_parameter(make_cfg, model):
    bound = 1e-3
    trainer, module, rec = _fit(make_cfg, model, max_steps=3, gradient_clip_val=bound)
    assert len(rec.norms_after) == 3
    assert all(n > bound for n in rec.norms_before)  # clipping had something to do
    assert all(n <= bound * (1 + 1e-4) for n in rec.norms_after)
    clipped = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert clipped == {id(p) for p in module.parameters()}  # the tables too


def test_lr_scheduler_steps_per_optimizer_step(make_cfg):
    trainer, _, rec = _fit(make_cfg, "dlrm", COSINE, max_steps=6, accumulate_grad_batches=2)
    base = [0.02, 0.001]  # model.sparse_optimizer.lr, model.optimizer.lr (conf/model/dlrm)
    expected = [lr * (1 + math.cos(math.pi * k / 6)) / 2 for k in range(6) for lr in base]
    assert [lr for lrs in rec.lrs for lr in (lrs[0], lrs[-1])] == pytest.approx(expected)
    assert trainer.lr_scheduler_configs[0].interval == "step"


def test_tables_step_by_sparse_rule_and_the_rest_by_dense_rule(make_cfg):
    trainer, module, _ = _fit(make_cfg, "dlrm", max_steps=2)
    (optimizer,) = trainer.optimizers
    tables = {id(p) for p in embedding_parameters(module.net)}
    assert tables
    for p in module.parameters():
        state = optimizer.state[p]
        if id(p) in tables:
            assert "sum" in state and "exp_avg" not in state  # Adagrad
            assert bool(state["sum"].abs().sum() > 0)
        else:
            assert "exp_avg" in state and "sum" not in state  # Adam
            assert int(state["step"]) == 2


def test_combined_optimizer_state_loads_into_a_fresh_one(make_cfg):
    trainer, module, _ = _fit(make_cfg, "dlrm", COSINE, max_steps=3)
    (trained,) = trainer.optimizers
    fresh = module.configure_optimizers()["optimizer"]  # empty state, as on resume
    fresh.load_state_dict(trained.state_dict())
    for p in module.parameters():
        assert trained.state[p].keys() == fresh.state[p].keys()
        for key, value in trained.state[p].items():
            assert torch.equal(torch.as_tensor(fresh.state[p][key]), torch.as_tensor(value))
    # the scheduled learning rates, not the initial ones
    assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in trained.param_groups]


def test_cosine_with_warmup():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = cosine_with_warmup(opt, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    cos = [(1 + math.cos(math.pi * k / 4)) / 2 for k in range(5)]
    assert lrs == pytest.approx([0.0, 0.5, *cos, 0.0])
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        cosine_with_warmup(opt, warmup_steps=6, total_steps=6)
