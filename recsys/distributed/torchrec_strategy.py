"""TorchRec model parallelism as a Lightning strategy: sharded embedding tables, DDP dense part."""

from __future__ import annotations

import logging
import shutil
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from hydra.utils import instantiate
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from recsys.checkpoint import META_FILE, load_meta, load_shards
from recsys.errors import InputError
from recsys.models.dlrm import tables_on

log = logging.getLogger(__name__)

SHARDING_TYPES = {t.value: t for t in ShardingType}


def _plain(value: Any) -> Any:
    """``value`` in the types that ``torch.load(weights_only=True)`` reads: Hydra containers
    and other mappings (Lightning's ``AttributeDict``) as dicts, named tuples as tuples, numpy
    arrays as tensors, numpy scalars as Python numbers."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, np.ndarray):
        return torch.tensor(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        plain = {_plain(k): _plain(v) for k, v in value.items()}
        return OrderedDict(plain) if isinstance(value, OrderedDict) else plain
    if isinstance(value, list | tuple) and not isinstance(value, torch.Size):
        plain = [_plain(v) for v in value]
        return plain if isinstance(value, list) else tuple(plain)
    return value


class TorchRecStrategy(DDPStrategy):
    """Shards the model's `EmbeddingBagCollection` tables across ranks with TorchRec.

    At setup (every stage) the embedding tables get their sparse optimizer fused into the
    backward pass (``model.sparse_optimizer``, TorchRec's ``apply_optimizer_in_backward``),
    `EmbeddingShardingPlanner` places them (only the ``sharding_types`` allowed: table-wise or
    column-wise on CPU/gloo; on CUDA/NCCL leave it null for the planner's choice), and
    `DistributedModelParallel` shards them and wraps the dense part in DDP. The module's
    ``configure_optimizers`` leaves the fused tables out, so Lightning's optimizer (clipping,
    LR scheduler) covers the dense parameters; ``accumulate_grad_batches`` must be 1.

    Checkpoints are folders written through ``torch.distributed.checkpoint`` by every rank:
    each rank's table shards and fused optimizer state, plus ``meta.pt`` (the rest of the
    Lightning checkpoint: loops, dense optimizer, hyperparameters, as plain containers and
    tensors) from rank 0. Loading puts every shard back on the rank that owns it under the
    current plan, and runs no code from the folder (`recsys.checkpoint.load_meta`,
    `recsys.checkpoint.load_shards`).

    Tables made inside `model_sharded_context` (``recsys.train.build`` and
    ``recsys.evaluate.run`` build the module there) start on the meta device: no rank
    materialises them whole, and `DistributedModelParallel` allocates and initialises each
    rank's own shards on its device.

    Evaluation loaders must give every rank the same number of rows, because sharded lookups
    are collective: all ranks step together. The data module does (``data.even_eval_shards``,
    which ``conf/trainer/torchrec.yaml`` sets; up to ``world_size - 1`` rows are left out); the
    strategy refuses to start on more than one rank without it.

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

    @contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        """Embedding tables made inside start on the meta device (`recsys.models.dlrm.tables_on`):
        sharding allocates only each rank's shards. Other parameters and buffers are made as
        usual, on the CPU."""
        with tables_on("meta"):
            yield

    def model_to_device(self) -> None:
        # tables still on the meta device are allocated by the sharding, on its device
        self.model._apply(lambda t: t if t.is_meta else t.to(self.root_device))

    def setup(self, trainer: L.Trainer) -> None:
        self._check_even_eval_shards(trainer.datamodule)
        self.accelerator.setup(trainer)
        self.model_to_device()
        self.model = self._shard(self.model, fitting=trainer.state.fn == TrainerFn.FITTING)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _check_even_eval_shards(self, datamodule: L.LightningDataModule | None) -> None:
        """Sharded lookups are collective: every rank must step through as many evaluation
        batches, which the data module gives with ``data.even_eval_shards`` (set by
        trainer=torchrec)."""
        if self.world_size > 1 and not getattr(datamodule, "even_eval_shards", True):
            raise InputError(
                "trainer.strategy=torchrec evaluates collectively (sharded lookups), so every "
                "rank needs as many evaluation batches: set data.even_eval_shards=true "
                "(trainer=torchrec sets it)"
            )

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
        if fitting and module.trainer.accumulate_grad_batches > 1:
            raise ValueError(
                "trainer.strategy=torchrec steps the tables' optimizer in every backward pass: "
                "trainer.accumulate_grad_batches must be 1 (raise data.batch_size instead)"
            )
        sparse_config = module.hparams.get("sparse_optimizer")
        if not sparse_config:
            raise ValueError(
                "trainer.strategy=torchrec needs model.sparse_optimizer: the "
                "optimizer fused into the sharded tables (e.g. torch.optim.Adagrad)"
            )
        # the module's own sparse optimizer, fused into backward as sharded tables need;
        # its configure_optimizers then leaves the tables out
        sparse = instantiate(sparse_config)
        for ebc in tables:
            apply_optimizer_in_backward(sparse.func, ebc.parameters(), sparse.keywords)

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
        on_meta = [n for n, p in module.named_parameters() if p.is_meta]
        if on_meta and self.is_global_zero:
            log.info("TorchRec: tables on the meta device, allocated shard by shard: %s", on_meta)
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
        if self.is_global_zero:  # loadable with weights_only=True
            torch.save(_plain(checkpoint), path / META_FILE)
        self.barrier("torchrec_save_checkpoint")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        meta = load_meta(checkpoint_path)  # weights_only=True whatever Lightning asks
        module = self.lightning_module
        state = {
            "state_dict": module.state_dict(),
            "sparse_optimizer": self._sparse_optimizer_state(),
        }
        load_shards(state, checkpoint_path)
        module.load_state_dict(state["state_dict"])
        if self._sharded:
            self.model.fused_optimizer.load_state_dict(state["sparse_optimizer"])
        return meta

    def load_model_state_dict(self, checkpoint: dict, strict: bool = True) -> None:
        pass  # loaded shard by shard in load_checkpoint

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            shutil.rmtree(filepath, ignore_errors=True)
