"""Distributed training: the TorchRec model-parallel strategy (``trainer.strategy=torchrec``)."""

from lightning.pytorch.strategies import StrategyRegistry

from recsys.distributed.torchrec_strategy import TorchRecStrategy

if "torchrec" not in StrategyRegistry:
    StrategyRegistry.register(
        "torchrec", TorchRecStrategy, description="TorchRec sharded embeddings, DDP dense part"
    )

__all__ = ["TorchRecStrategy"]
