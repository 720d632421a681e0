"""DDP on CPU (gloo): rank-sharded loaders, 2-process runs, torchrun across two "nodes"."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from recsys.data.loader import BatchIndexSampler
from recsys.train import build, run

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _iterate_sampler(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = torch.arange(1003)
    train = BatchIndexSampler(rows, 64, shuffle=True, seed=5)
    evaluation = BatchIndexSampler(rows, 64, shuffle=False, even_shards=False)
    seen = {
        "train": torch.cat([b.rows for b in train]),
        "eval": torch.cat([b.rows for b in evaluation]),
        "lengths": (len(train), len(evaluation)),
        "batches": (len(list(train)), len(list(evaluation))),
    }
    torch.save(seen, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_sampler_gives_each_rank_a_disjoint_share(tmp_path):
    mp.spawn(_iterate_sampler, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # training: equal shares (same number of steps on every rank), disjoint
    assert len(r0["train"]) == len(r1["train"]) == 501
    # len() of each sampler is the number of batches it yields on its rank
    assert r0["lengths"] == r0["batches"] and r1["lengths"] == r1["batches"]
    assert not set(r0["train"].tolist()) & set(r1["train"].tolist())
    # evaluation: every row exactly once over the two ranks
    assert torch.equal(torch.cat([r0["eval"], r1["eval"]]).sort().values, torch.arange(1003))


def _first_negatives(rank: int, world: int, port: int, data_cfg: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    L.seed_everything(42)  # as Lightning does on every rank
    dm = instantiate(data_cfg)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    p = int(batch.labels.sum())
    torch.save(batch.ids("item_id")[p:], Path(out) / f"negatives{rank}.pt")
    dist.destroy_process_group()


def test_ranks_draw_different_training_negatives(make_cfg, tmp_path):
    """Under DDP each rank draws its own negatives (its own generator per rank and epoch),
    not the same items at the same positions."""
    cfg = make_cfg("data=movielens", "data.variant=100k", "data.feedback=implicit")
    instantiate(cfg.data).prepare_data()
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    mp.spawn(_first_negatives, args=(2, _free_port(), data_cfg, str(tmp_path)), nprocs=2)
    n0, n1 = (torch.load(tmp_path / f"negatives{r}.pt") for r in (0, 1))
    assert n0.shape == n1.shape
    same = (n0 == n1).float().mean().item()
    print(f"positions holding the same negative on both ranks: {same:.1%}")
    assert same < 0.01  # ~1/1682 by chance


class RecordTrainingPairs(L.Callback):
    """Saves the (user, item) pairs each rank trained on in the first epoch."""

    def __init__(self, folder: str):
        self.folder = folder
        self.pairs: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0:
            self.pairs.append(torch.stack([batch.ids("user_id"), batch.ids("item_id")], 1))

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            torch.save(
                torch.cat(self.pairs).cpu(), Path(self.folder) / f"rank{trainer.global_rank}.pt"
            )


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(make_cfg, tmp_path, caplog):
    common = [
        "data=movielens",
        "data.variant=100k",
        "trainer.max_epochs=3",
        "callbacks.early_stopping=null",
        "logger=csv",
    ]
    one = run(make_cfg(*common, "data.batch_size=1024", output_dir=tmp_path / "one"))

    cfg = make_cfg(
        *common,
        "trainer=ddp_spawn",
        "trainer.accelerator=cpu",
        "data.batch_size=512",
        output_dir=tmp_path / "two",
    )
    with open_dict(cfg):
        cfg.callbacks["record"] = {
            "_target_": f"{__name__}.RecordTrainingPairs",
            "folder": str(tmp_path),
        }
    two = run(cfg)
    print(f"test AUROC: 1 process {one['test/auroc']:.4f}, 2 processes {two['test/auroc']:.4f}")
    assert abs(one["test/auroc"] - two["test/auroc"]) < 0.02

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    keys0 = set((r0[:, 0] * 10_000 + r0[:, 1]).tolist())
    keys1 = set((r1[:, 0] * 10_000 + r1[:, 1]).tolist())
    assert len(r0) == len(r1) and not keys0 & keys1  # disjoint shares of the epoch
    assert len(keys0 | keys1) >= 0.99 * 80_000  # together the whole training split
    # the per-query figures stayed in the spawned processes: said, not silently missing
    assert "test_queries.parquet and test_rows.parquet are not written" in caplog.text
    # checkpoints and metrics.json written once, by rank 0
    assert (
        json.loads((tmp_path / "two" / "metrics.json").read_text())["test/auroc"]
        == two["test/auroc"]
    )
    assert (tmp_path / "two" / "checkpoints" / "last.ckpt").is_file()
    assert "test/auroc" in (tmp_path / "two" / "csv" / "metrics.csv").read_text()
    # the validation figures of the tested checkpoint come back from the spawned processes
    best = torch.load(two["best_model_path"], map_location="cpu", weights_only=True)
    (state,) = (
        v
        for k, v in best["callbacks"].items()
        if k.startswith("ModelCheckpoint{'monitor': 'val/auroc'")
    )
    assert two["best_epoch"] == best["epoch"] and two["best_step"] == best["global_step"]
    assert two["val/auroc"] == pytest.approx(float(state["best_model_score"]))


@pytest.mark.slow
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_two_process_ddp_steps_equal_one_process_steps(make_cfg, tmp_path, sparse_grad):
    """Explicit feedback (no sampled negatives): each DDP step's two shares of 512 rows are
    the one-process step's 1,024 (`BatchIndexSampler`), and DDP all-reduces the gradients of
    the two halves' mean losses, so both runs take the same steps, row-sparse table gradients
    (all-reduced by gloo) and RowSparseAdam included: the weights agree to float rounding
    (1e-7 when written). Adam's steps do not change with the gradients' scale, so this does
    not tell an average from a sum."""
    common = [
        "data=movielens",
        "data.variant=100k",
        "model.variant=neumf",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=30",
        "callbacks.early_stopping=null",
        "logger=none",
    ]
    if sparse_grad:
        common += [
            "model.sparse_grad=true",
            "model.sparse_optimizer={_target_: recsys.lit.optim.RowSparseAdam, _partial_: true, "
            "lr: 0.001}",
        ]
    one = run(make_cfg(*common, "data.batch_size=1024", output_dir=tmp_path / "one"))
    two = run(
        make_cfg(
            *common,
            "trainer=ddp_spawn",
            "trainer.accelerator=cpu",
            "data.batch_size=512",
            output_dir=tmp_path / "two",
        )
    )
    weights = [
        torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for r in ("one", "two")
    ]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=1e-6, msg=name)
    cfg = make_cfg(*common, "data.batch_size=1024", output_dir=tmp_path / "start")
    L.seed_everything(cfg.seed)  # as run() does: the weights both runs started from
    start = build(cfg)[1].state_dict()
    assert all(not torch.equal(weights[0][n], start[n]) for n in start if n.startswith("net."))
    assert one["test/auroc"] == pytest.approx(two["test/auroc"], abs=1e-4)


@pytest.mark.slow
def test_torchrun_two_nodes(data_dir, cache_dir, tmp_path):
    """Two torchrun launches (node_rank 0 and 1, one process each) train one model."""
    port = _free_port()
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc_per_node=1",
            f"--node_rank={node}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "train.py",
            "trainer=ddp",
            "trainer.devices=1",
            "trainer.num_nodes=2",
            "trainer.accelerator=cpu",
            "data=synthetic",
            "trainer.max_epochs=2",
            "logger=none",
            f"paths.data_dir={data_dir}",
            f"paths.cache_dir={cache_dir}",
            f"hydra.run.dir={tmp_path / f'node{node}'}",
            "callbacks.progress_bar.refresh_rate=0",
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for node, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"node {node}:\n{out[-3000:]}"
    metrics = json.loads((tmp_path / "node0" / "metrics.json").read_text())
    assert 0 < metrics["test/auroc"] <= 1
    assert not (tmp_path / "node1" / "metrics.json").exists()  # rank 0 reports, once
