"""TorchRec model parallelism inside Lightning: sharded DLRM on 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.fabric.utilities.data import AttributeDict
from omegaconf import OmegaConf
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from recsys import evaluate
from recsys.data.identity import data_settings
from recsys.distributed import TorchRecStrategy
from recsys.errors import InputError
from tests.conftest import compose_cfg

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


class RecordTableDevices(L.Callback):
    """Saves, per rank, which parameters are on the meta device before the strategy shards the
    module (``setup`` runs before ``strategy.setup``) and once training starts (sharded)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.record = {}

    def setup(self, trainer, pl_module, stage):
        self.record["before"] = {n: p.is_meta for n, p in pl_module.named_parameters()}

    def on_train_start(self, trainer, pl_module):
        def meta(t):  # a sharded table: its local shards (none on a rank without one)
            if isinstance(t, ShardedTensor):
                return any(s.tensor.is_meta for s in t.local_shards())
            return torch.is_tensor(t) and t.is_meta

        model = trainer.strategy.model
        self.record["after"] = {n: meta(p) for n, p in model.named_parameters()}
        self.record["after_state"] = [k for k, v in pl_module.state_dict().items() if meta(v)]
        self.record["hparams"] = repr(dict(pl_module.hparams))
        torch.save(self.record, Path(self.folder) / f"rank{trainer.global_rank}.pt")


def _run(script, data_dir, cache_dir, run_dir, *overrides):
    out = subprocess.run(
        [
            sys.executable,
            script,
            "trainer=torchrec",
            "trainer.accelerator=cpu",
            f"paths.data_dir={data_dir}",
            f"paths.cache_dir={cache_dir}",
            f"hydra.run.dir={run_dir}",
            *overrides,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def _train(tmp_path, data_dir, cache_dir, run_dir, *overrides):
    return _run(
        "train.py",
        data_dir,
        cache_dir,
        run_dir,
        "model=dlrm",
        "data=movielens",
        "data.variant=100k",
        "logger=csv",
        "callbacks.progress_bar.refresh_rate=0",
        *overrides,
    )


@pytest.mark.slow
def test_sharded_dlrm_trains_saves_and_resumes_exactly(tmp_path, data_dir, cache_dir):
    first = tmp_path / "first"
    devices = tmp_path / "devices"
    devices.mkdir()
    out = _train(
        tmp_path,
        data_dir,
        cache_dir,
        first,
        "trainer.max_epochs=1",
        f"+callbacks.devices._target_={__name__}.RecordTableDevices",
        f"+callbacks.devices.folder={devices}",
    )
    # the tables start on the meta device on every rank (nothing else does), and sharding
    # allocates them: no rank materialised a whole table before
    for rank in (0, 1):
        record = torch.load(devices / f"rank{rank}.pt", weights_only=True)
        tables = {n for n in record["before"] if "embedding_bags" in n}
        assert tables and {n for n, meta in record["before"].items() if meta} == tables
        assert not any(record["after"].values()) and not record["after_state"]
        assert "meta" not in record["hparams"]
    assert "tables on the meta device, allocated shard by shard" in out
    metrics = json.loads((first / "metrics.json").read_text())
    assert metrics["test/auroc"] > metrics["popularity/test/auroc"]
    last = first / "checkpoints" / "last.ckpt"
    assert (last / "meta.pt").is_file() and list(last.glob("*.distcp"))
    meta = torch.load(last / "meta.pt", weights_only=True)  # no code runs from a checkpoint
    assert {"loops", "callbacks", "optimizer_states", "hyper_parameters"} <= meta.keys()

    # evaluate.py tests the sharded checkpoint as the run did (1 epoch: last is the best)
    _run(
        "evaluate.py",
        data_dir,
        cache_dir,
        tmp_path / "evaluate",
        f"ckpt_path={last}",
        "+trainer.enable_progress_bar=false",
    )
    evaluated = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert evaluated["test/auroc"] == pytest.approx(metrics["test/auroc"], abs=1e-6)

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
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    ranks = [torch.load(dumps / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
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


class Tripwire:
    """Unpickles as a call that leaves ``marker`` behind: loading must refuse it, not run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


class WithExtraState(L.LightningModule):
    """A layer plus a non-tensor, non-container state entry, which DCP stores pickled."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 1)
        self.extra = None

    def get_extra_state(self):
        return self.extra

    def set_extra_state(self, state):
        self.extra = state


def _sharded_checkpoint(folder: Path, module: L.LightningModule, meta: dict) -> None:
    """A checkpoint folder as `TorchRecStrategy.save_checkpoint` lays it out (one process)."""
    dcp.save({"state_dict": module.state_dict(), "sparse_optimizer": {}}, checkpoint_id=folder)
    torch.save(meta, folder / "meta.pt")


def test_sharded_checkpoint_meta_loads_weights_only(tmp_path):
    """meta.pt holds plain containers and tensors, whatever Lightning or callbacks put there
    (AttributeDict, Hydra containers, numpy), and the folder restores weights and meta."""
    source = WithExtraState()
    source.extra = "seen 7"
    checkpoint = {
        "state_dict": source.state_dict(),
        "epoch": np.int64(2),
        "hyper_parameters": AttributeDict(net="x", optimizer=OmegaConf.create({"lr": 0.1})),
        "callbacks": {"ModelCheckpoint": {"best_k_models": {"a.ckpt": np.float32(0.5)}}},
        "loops": {"scores": np.arange(3)},
    }
    folder = tmp_path / "last.ckpt"
    TorchRecStrategy().save_checkpoint(checkpoint, folder)

    meta = torch.load(folder / "meta.pt", weights_only=True)
    assert "state_dict" not in meta and meta["epoch"] == 2
    assert meta["hyper_parameters"] == {"net": "x", "optimizer": {"lr": 0.1}}
    assert type(meta["hyper_parameters"]["optimizer"]) is dict
    assert meta["callbacks"]["ModelCheckpoint"]["best_k_models"] == {"a.ckpt": 0.5}
    assert torch.equal(meta["loops"]["scores"], torch.arange(3))

    target = WithExtraState()
    strategy = TorchRecStrategy()
    strategy.connect(target)
    assert strategy.load_checkpoint(folder)["hyper_parameters"] == meta["hyper_parameters"]
    assert torch.equal(target.layer.weight, source.layer.weight)
    assert target.extra == "seen 7"


@pytest.mark.parametrize("where", ["meta", "shard", "dcp_metadata"])
def test_sharded_checkpoint_with_code_is_refused(where, tmp_path, data_dir, cache_dir):
    """A pickled object that would run code, in meta.pt, in a non-tensor shard entry or in
    DCP's .metadata: loading raises ValueError and the code never runs."""
    marker = tmp_path / "code_ran"
    folder = tmp_path / "last.ckpt"
    module = WithExtraState()
    module.extra = Tripwire(marker) if where == "shard" else "seen 1"
    meta = {"epoch": 0, "data_config": {"_target_": "recsys.data.MovieLensDataModule"}}
    if where == "meta":
        meta["hyper_parameters"] = Tripwire(marker)
    _sharded_checkpoint(folder, module, meta)
    if where == "dcp_metadata":
        (folder / ".metadata").write_bytes(pickle.dumps(Tripwire(marker)))

    strategy = TorchRecStrategy()
    strategy.connect(WithExtraState())
    with pytest.raises(ValueError, match="never runs code"):
        strategy.load_checkpoint(folder)
    assert not marker.exists()
    if where == "meta":
        cfg = compose_cfg("evaluate", data_dir, cache_dir, tmp_path, f"ckpt_path={folder}")
        with pytest.raises(ValueError, match=r"meta\.pt holds .* never runs code"):
            evaluate.load_checkpoint(cfg)
        assert not marker.exists()


@pytest.mark.parametrize("name", ["train", "evaluate"])
def test_trainer_torchrec_asks_the_data_for_even_eval_shards(name, data_dir, cache_dir, tmp_path):
    """The data module owns ``even_eval_shards`` (a data setting that leaves the data alone);
    ``trainer=torchrec`` sets it through the config, for training and for evaluation."""
    plain = compose_cfg(name, data_dir, cache_dir, tmp_path)
    sharded = compose_cfg(name, data_dir, cache_dir, tmp_path, "trainer=torchrec")
    assert plain.data.even_eval_shards is False and sharded.data.even_eval_shards is True
    if name == "train":
        dm = instantiate(sharded.data)
        assert dm.even_eval_shards and dm.protocol.even_eval_shards
        assert "even_eval_shards" not in data_settings(dm.hparams)


def test_torchrec_refuses_uneven_evaluation_shards_on_several_ranks():
    two_ranks = LightningEnvironment()
    two_ranks.set_world_size(2)
    strategy = TorchRecStrategy(cluster_environment=two_ranks)
    uneven = SimpleNamespace(datamodule=SimpleNamespace(even_eval_shards=False))
    with pytest.raises(InputError, match=r"set data\.even_eval_shards=true"):
        strategy.setup(uneven)
