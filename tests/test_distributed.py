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
from omegaconf import open_dict

from recsys.data.loader import BatchIndexSampler
from recsys.train import run

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
        "train": torch.cat(list(train)),
        "eval": torch.cat(list(evaluation)),
        "train_len": len(train),
    }
    torch.save(seen, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_sampler_gives_each_rank_a_disjoint_share(tmp_path):
    mp.spawn(_iterate_sampler, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # training: equal shares (same number of steps on every rank), disjoint
    assert len(r0["train"]) == len(r1["train"]) == 501 and r0["train_len"] == r1["train_len"]
    assert not set(r0["train"].tolist()) & set(r1["train"].tolist())
    # evaluation: every row exactly once over the two ranks
    assert torch.equal(torch.cat([r0["eval"], r1["eval"]]).sort().values, torch.arange(1003))


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
def test_two_process_ddp_matches_one_process(make_cfg, tmp_path):
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
    # checkpoints and metrics.json written once, by rank 0
    assert (
        json.loads((tmp_path / "two" / "metrics.json").read_text())["test/auroc"]
        == two["test/auroc"]
    )
    assert (tmp_path / "two" / "checkpoints" / "last.ckpt").is_file()
    assert "test/auroc" in (tmp_path / "two" / "csv" / "metrics.csv").read_text()


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
