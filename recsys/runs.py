"""What every command's run shares: the Trainer's callbacks and loggers from their config
groups, where the module is built under the Trainer's strategy, and the report of a run's
metrics (``metrics.json`` and the printed table)."""

from __future__ import annotations

import json
import logging
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from recsys.console import format_value, results_table
from recsys.distributed import TorchRecStrategy  # also registers trainer.strategy=torchrec

log = logging.getLogger(__name__)


def instantiate_group(cfg: DictConfig | None) -> list:
    """Instantiate every entry of a config group that holds several objects (callbacks,
    loggers); entries set to null are skipped."""
    return [instantiate(c) for c in (cfg or {}).values() if c is not None]


def model_context(trainer: L.Trainer) -> AbstractContextManager:
    """Where the module is built: `TorchRecStrategy.model_sharded_context` under
    trainer=torchrec (embedding tables on the meta device, allocated shard by shard when the
    strategy shards them); the CPU, as usual, under every other strategy."""
    if isinstance(trainer.strategy, TorchRecStrategy):
        return trainer.strategy.model_sharded_context()
    return nullcontext()


@rank_zero_only
def report(metrics: dict, output_dir: Path, title: list[str]) -> None:
    """Write ``metrics.json`` into the run folder and print the results: ``title`` (what was
    run), the test figures against the popularity baseline (`results_table`), the validation
    and training figures, and where the files are."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    fit = [
        f"{k} {format_value(k, v)}"
        for k, v in sorted(metrics.items())
        if k.startswith(("val/", "train/")) and isinstance(v, int | float)
    ]
    lines = [*title, "", results_table(metrics)]
    if fit:
        lines += ["", "  ".join(fit)]
    lines.append(f"run folder: {output_dir} (metrics.json, checkpoints/, .hydra/config.yaml)")
    log.info("Results\n%s", "\n".join(lines))
