"""TorchRec model parallelism inside Lightning: sharded DLRM on 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

ROOT = Path(__file__).resolve().parents[1]


class DumpShards(L.Callback):
    """Saves each rank's table shards and fused-optimizer shards when training starts (after
    a checkpoint was restored)."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_start(self, trainer, pl_module):
        out = {}

        def local(name, value):
            if isinstance(value, ShardedTensor):
                out[name] = [
                    (list(s.metadata.shard_offsets), s.tensor.detach().clone())
                    for s in value.local_shards()
                ]

        for name, value in pl_module.state_dict().items():
            local(f"weight/{name}", value)
        for param, states in trainer.strategy.model.fused_optimizer.state_dict()["state"].items():
            for key, value in states.items():
                local(f"optimizer/{param}/{key}", value)
        torch.save(out, Path(self.folder) / f"rank{trainer.global_rank}.pt")


def _train(tmp_path, data_dir, cache_dir, run_dir, *overrides):
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "model=dlrm",
            "trainer=torchrec",
            "trainer.accelerator=cpu",
            "data=movielens",
            "data.variant=100k",
            "logger=csv",
            f"paths.data_dir={data_dir}",
            f"paths.cache_dir={cache_dir}",
            f"hydra.run.dir={run_dir}",
            "callbacks.progress_bar.refresh_rate=0",
            *overrides,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.mark.slow
def test_sharded_dlrm_trains_saves_and_resumes_exactly(tmp_path, data_dir, cache_dir):
    first = tmp_path / "first"
    _train(tmp_path, data_dir, cache_dir, first, "trainer.max_epochs=1")
    metrics = json.loads((first / "metrics.json").read_text())
    assert metrics["test/auroc"] > metrics["popularity/test/auroc"]
    last = first / "checkpoints" / "last.ckpt"
    assert (last / "meta.pt").is_file() and list(last.glob("*.distcp"))

    dumps = tmp_path / "dumps"
    dumps.mkdir()
    _train(
        tmp_path,
        data_dir,
        cache_dir,
        tmp_path / "second",
        "trainer.max_epochs=2",
        f"ckpt_path={last}",
        f"+callbacks.dump._target_={__name__}.DumpShards",
        f"+callbacks.dump.folder={dumps}",
    )

    dcp_to_torch_save(last, tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=False)
    ranks = [torch.load(dumps / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    tables = {k for k in full["state_dict"] if "embedding_bags" in k}
    # every table lives on exactly one rank (table-wise), and both ranks hold tables
    holders = [
        {
            k.removeprefix("weight/")
            for k, shards in r.items()
            if k.startswith("weight/") and any(t.numel() for _, t in shards)
        }
        for r in ranks
    ]
    assert holders[0] and holders[1] and not holders[0] & holders[1]
    assert holders[0] | holders[1] == tables
    checked = 0
    for r in ranks:
        for key, shards in r.items():
            kind, _, name = key.partition("/")
            if kind == "weight":
                reference = full["state_dict"][name]
            else:
                param, _, state = name.rpartition("/")
                reference = full["sparse_optimizer"]["state"][param][state]
            for offsets, tensor in shards:
                region = tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape, strict=True))
                assert torch.equal(tensor, reference[region]), key
                checked += tensor.numel()
    assert checked > 0
    optimizer_keys = [k for r in ranks for k in r if k.startswith("optimizer/")]
    assert optimizer_keys and any(
        bool(t.abs().sum() > 0) for r in ranks for k in optimizer_keys if k in r for _, t in r[k]
    )
