"""What a run prints: library messages a user cannot act on are silenced, and the results come
as one table under a line that says what was run."""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Callable
from numbers import Number
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import lightning as L

log = logging.getLogger(__name__)

# Lightning's start-up lines (accelerators found, tips, "Seed set to", callbacks it skipped) and
# torch's is_fx_tracing notice (raised by TorchRec's modules): the run's own summary says what
# matters. Lightning's warnings still come through.
QUIET_LOGGERS = {
    "lightning.pytorch": logging.WARNING,
    "lightning.fabric": logging.WARNING,
    "torch.fx._symbolic_trace": logging.ERROR,
}

# counts among the metrics, printed as integers
COUNT_SUFFIXES = ("_rows", "_epoch", "_step")


def load_task(name: str) -> Callable:
    """``recsys.<name>.run``, imported with the root logger at WARNING: the entry points import
    their task (torch, Lightning, TorchRec) once Hydra has parsed the command line and set up
    logging, and fbgemm_gpu logs every library it loads at INFO on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        return importlib.import_module(f"recsys.{name}").run
    finally:
        root.setLevel(level)


def quiet_libraries() -> None:
    """Silence the library messages listed in `QUIET_LOGGERS`, and torch's notice on the pytree
    type that Lightning's internals use."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )


def describe(dm, model) -> str:
    """``NeuMF (neumf) on ml-100k, random split, explicit feedback, pointwise``: the model, the
    data and the evaluation protocol of a run, in a line."""
    name = type(model.net).__name__
    variant = model.hparams.get("variant")
    if variant and variant.lower() != name.lower():
        name = f"{name} ({variant})"
    protocol = dm.protocol
    evaluation = {
        None: "pointwise",
        "sampled": f"pointwise + ranking among {protocol.ranking_negatives} sampled negatives",
        "full": "pointwise + full ranking",
    }[protocol.ranking]
    return f"{name} on {dm.source}, {dm.split['kind']} split, {dm.feedback} feedback, {evaluation}"


def stop_reason(trainer: L.Trainer) -> str | None:
    """Why ``trainer.fit`` stopped: early stopping (with its monitor and patience), the step or
    epoch limit, or an interruption; None where the fit ran in other processes (ddp_spawn),
    whose trainer state this one does not have."""
    if getattr(trainer.strategy, "_start_method", None) in ("spawn", "forkserver"):
        return None
    from lightning.pytorch.callbacks import EarlyStopping

    if trainer.interrupted:
        return "interrupted"
    stopper = next((c for c in trainer.callbacks if isinstance(c, EarlyStopping)), None)
    if stopper is not None and stopper.stopped_epoch > 0:
        return f"{stopper.monitor} did not improve for {stopper.patience} validations"
    if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return f"trainer.max_steps={trainer.max_steps} reached"
    if trainer.fit_loop.max_batches == 0:
        return "no training batches"
    return f"trainer.max_epochs={trainer.max_epochs} reached"


def format_value(key: str, value: object) -> str:
    """A metric's value as printed: counts as integers, figures with four decimals."""
    if isinstance(value, Number) and (isinstance(value, int) or key.endswith(COUNT_SUFFIXES)):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}"
    return str(value)


def results_table(metrics: dict, baseline: str = "popularity/") -> str:
    """The test figures as ``metric | model | popularity | difference``; a row without a
    baseline figure leaves those columns empty, and without any baseline figure (data
    without items to be popular) the table is ``metric | model``."""
    keys = sorted(k for k in metrics if k.startswith("test/"))
    if not any(baseline + key in metrics for key in keys):
        rows = [("metric", "model"), *((key, format_value(key, metrics[key])) for key in keys)]
        return _columns(rows)
    rows = [("metric", "model", baseline.rstrip("/"), "difference")]
    for key in keys:
        value, other = metrics[key], metrics.get(baseline + key)
        if other is None or key.endswith(COUNT_SUFFIXES):
            rows.append((key, format_value(key, value), "", ""))
        else:
            rows.append(
                (key, format_value(key, value), format_value(key, other), f"{value - other:+.4f}")
            )
    return _columns(rows)


def _columns(rows: list[tuple[str, ...]]) -> str:
    """Rows as aligned columns under a rule: the first left-aligned, the others right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)
