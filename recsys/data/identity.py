"""Data identity: which settings make a dataset what it is, and how a checkpoint's data is
compared with a run's. A checkpoint saves its data module's `data_settings` and processed
folder; a run that meets other data says which settings differ and how to restore them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from recsys.errors import InputError

# data.split's keys left out; checkpoints written before a key was added read as its default
SPLIT_DEFAULTS = {"kind": "random", "val": 0.1, "test": 0.1, "val_row": "previous"}

# Hyperparameters that leave the data itself alone (which rows train, validate and test, and
# their labels): machine paths, loader settings and the evaluation-only protocol. Any other
# change, or other processed data, makes another dataset: a checkpoint refuses it.
FREE_KEYS = frozenset(
    {
        "data_dir",
        "cache_dir",
        "path",  # a CSV's content is in the processed folder's name
        "download",
        "rebuild",
        "batch_size",
        "eval_batch_size",
        "num_workers",
        "pin_memory",
        "device",  # where the same batches are built
        "ranking",
        "ranking_negatives",
        "drop_cold_start",
        "even_eval_shards",  # how evaluation rows are spread over ranks
        # streaming reads the same rows from shards
        "streaming",
        "block_rows",
        "window_blocks",
        "shards_url",
        "stream_cache_size",
    }
)


def data_settings(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The data module hyperparameters that make the data what it is (all but `FREE_KEYS`),
    the split with its defaults filled in: what a checkpoint saves and compares."""
    settings = {k: v for k, v in hparams.items() if k not in FREE_KEYS}
    return {**settings, "split": {**SPLIT_DEFAULTS, **(hparams.get("split") or {})}}


class DataMismatchError(InputError):
    """A checkpoint meets data other than the data it was trained on."""


_UNSET = "<unset>"


def settings_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, current value)}`` of the data settings that differ; a key
    on one side only reads as ``<unset>`` on the other. Unset, null and empty lists or maps
    are the same setting (an option added later, left at its empty default, changes nothing).
    """
    if "split" in saved:  # split.val_row came later: before it, the previous row
        saved = {**saved, "split": {**SPLIT_DEFAULTS, **saved["split"]}}
    old, new = _flatten(saved), _flatten(current)
    return {
        k: (old.get(k, _UNSET), new.get(k, _UNSET))
        for k in sorted(old.keys() | new.keys())
        if not _same(old.get(k, _UNSET), new.get(k, _UNSET))
    }


def _same(a: Any, b: Any) -> bool:
    return a == b or (_empty(a) and _empty(b))


def _empty(value: Any) -> bool:
    return value is None or value == _UNSET or (isinstance(value, list | dict) and not value)


def merge_settings(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` applied key by key, into nested dicts too."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            value = merge_settings(merged[key], value)
        merged[key] = value
    return merged


def _flatten(settings: dict, prefix: str = "") -> dict[str, Any]:
    """``{"split": {"kind": "random"}}`` -> ``{"split.kind": "random"}``."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _override(value: Any) -> str:
    """A value as a Hydra override writes it."""
    return value if isinstance(value, str) else json.dumps(value)


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """``data.seed: 42 -> 7, data.split.kind: random -> temporal``."""
    return ", ".join(
        f"{k if k == 'processed data' else 'data.' + k}: {_override(old)} -> {_override(new)}"
        for k, (old, new) in changes.items()
    )


def restore_hint(changes: dict[str, tuple[Any, Any]]) -> str:
    """`` (data.seed=42 data.split.kind=random)``: the overrides that restore the checkpoint's
    data settings; the processed data itself comes back with the raw files it was built from."""
    keys = [k for k in changes if k != "processed data"]
    hints = [f"data.{k}={_override(changes[k][0])}" for k in keys if changes[k][0] != _UNSET]
    if "processed data" in changes:
        hints.append("and the raw files it was built from")
    return f" ({' '.join(hints)})" if hints else ""
