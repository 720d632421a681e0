"""TorchRec model parallelism as a Lightning strategy: sharded embedding tables, DDP dense part."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from hydra.utils import get_class
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

log = logging.getLogger(__name__)

META_FILE = "meta.pt"
SHARDING_TYPES = {t.value: t for t in ShardingType}


class TorchRecStrategy(DDPStrategy):
    """Shards the model's `EmbeddingBagCollection` tables across ranks with TorchRec.

    At setup (every stage) the embedding tables get their sparse optimizer fused into the
    backward pass (``model.sparse_optimizer``, TorchRec's ``apply_optimizer_in_backward``),
    `EmbeddingShardingPlanner` places them (only the ``sharding_types`` allowed: table-wise or
    column-wise on CPU/gloo; on CUDA/NCCL leave it null for the planner's choice), and
    `DistributedModelParallel` shards them and wraps the dense part in DDP. The Lightning
    optimizer then steps the dense parameters only.

    Checkpoints are folders written through ``torch.distributed.checkpoint`` by every rank:
    each rank's table shards and fused optimizer state, plus ``meta.pt`` (the rest of the
    Lightning checkpoint: loops, dense optimizer, hyperparameters) from rank 0. Loading puts
    every shard back on the rank that owns it under the current plan.

    Evaluation loaders give every rank the same number of rows (up to ``world_size - 1`` rows
    are left out), because sharded lookups are collective: all ranks step together.

    Args:
        sharding_types: sharding types the planner may use for every table, e.g.
            ``[table_wise]``; None lets it choose.
        **kwargs: passed to `DDPStrategy` (``start_method``, ``process_group_backend``, ...).
    """

    strategy_name = "torchrec"

    def __init__(self, sharding_types: list[str] | None = ("table_wise",), **kwargs: Any):
        super().__init__(**kwargs)
        unknown = set(sharding_types or ()) - set(SHARDING_TYPES)
        if unknown:
            raise ValueError(f"sharding_types {sorted(unknown)} not in {sorted(SHARDING_TYPES)}")
        self.sharding_types = list(sharding_types) if sharding_types else None
        self.plan = None
        self._dmp: DistributedModelParallel | None = None  # reused by later stages (test)

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # shards are loaded into the sharded model

    def setup(self, trainer: L.Trainer) -> None:
        self.accelerator.setup(trainer)
        self.model_to_device()
        if trainer.datamodule is not None and hasattr(trainer.datamodule, "even_eval_shards"):
            trainer.datamodule.even_eval_shards = True
        self.model = self._shard(self.model, fitting=trainer.state.fn == TrainerFn.FITTING)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _shard(self, module: L.LightningModule, fitting: bool) -> nn.Module:
        if self._dmp is not None and self._dmp.module is module:
            return self._dmp  # sharded by an earlier stage (fit, then test)
        tables = [m for m in module.modules() if isinstance(m, EmbeddingBagCollection)]
        if not tables:
            if fitting:
                raise ValueError(
                    f"trainer.strategy=torchrec shards EmbeddingBagCollection tables and "
                    f"{type(module.net).__name__} has none: use model=dlrm, or another strategy"
                )
            return module  # nothing to shard (e.g. the popularity baseline): plain evaluation
        sparse = module.hparams.get("sparse_optimizer")
        if not sparse:
            raise ValueError(
                "trainer.strategy=torchrec needs model.sparse_optimizer: the "
                "optimizer fused into the sharded tables (e.g. torch.optim.Adagrad)"
            )
        sparse = {k: v for k, v in sparse.items() if k not in ("_target_", "_partial_")}
        optimizer_class = get_class(module.hparams.sparse_optimizer["_target_"])
        for ebc in tables:
            apply_optimizer_in_backward(optimizer_class, ebc.parameters(), sparse)
        module.fused_sparse = True  # configure_optimizers: dense parameters only
        module.automatic_optimization = True

        constraints = None
        if self.sharding_types:
            constraints = {
                cfg.name: ParameterConstraints(sharding_types=self.sharding_types)
                for ebc in tables
                for cfg in ebc.embedding_bag_configs()
            }
        planner = EmbeddingShardingPlanner(
            topology=Topology(
                world_size=self.world_size,
                compute_device=self.root_device.type,
                local_world_size=self.num_processes,
            ),
            constraints=constraints,
        )
        sharders = get_default_sharders()
        pg = dist.GroupMember.WORLD
        self.plan = planner.collective_plan(module, sharders, pg)
        if self.is_global_zero:
            log.info("TorchRec sharding plan:\n%s", self.plan)
        self._dmp = DistributedModelParallel(
            module,
            env=ShardingEnv.from_process_group(pg),
            device=self.root_device,
            plan=self.plan,
            sharders=sharders,
        )
        return self._dmp

    # --- checkpoints: a folder per checkpoint, written by every rank ----------------------
    def _sparse_optimizer_state(self) -> dict:
        return self.model.fused_optimizer.state_dict() if self._sharded else {}

    @property
    def _sharded(self) -> bool:
        return isinstance(self.model, DistributedModelParallel)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any = None) -> None:
        path = Path(filepath)
        state = {
            "state_dict": checkpoint.pop("state_dict"),
            "sparse_optimizer": self._sparse_optimizer_state(),
        }
        dcp.save(state, checkpoint_id=path)
        if self.is_global_zero:
            torch.save(checkpoint, path / META_FILE)
        self.barrier("torchrec_save_checkpoint")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        path = Path(checkpoint_path)
        if not (path / META_FILE).is_file():
            raise ValueError(
                f"{path} is not a checkpoint folder of trainer.strategy=torchrec (no {META_FILE})"
            )
        module = self.lightning_module
        state = {
            "state_dict": module.state_dict(),
            "sparse_optimizer": self._sparse_optimizer_state(),
        }
        dcp.load(state, checkpoint_id=path)  # each rank reads the shards it owns, in place
        module.load_state_dict(state["state_dict"])
        if self._sharded:
            self.model.fused_optimizer.load_state_dict(state["sparse_optimizer"])
        return torch.load(path / META_FILE, map_location="cpu", weights_only=False)

    def load_model_state_dict(self, checkpoint: dict, strict: bool = True) -> None:
        pass  # loaded shard by shard in load_checkpoint

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            shutil.rmtree(filepath, ignore_errors=True)
