"""Checkpoints read safely, and which checkpoint a command works on (a run's best, the latest
run's). `recsys.runs.load_checkpoint` turns one back into its model and data.

Every checkpoint is read with ``weights_only=True`` (`load_weights_only`, `load_meta`,
`load_shards`): tensors and plain containers only, so a checkpoint from elsewhere never runs
code here; anything else raises `RefusedCheckpoint`."""

from __future__ import annotations

import dataclasses
import enum
import importlib
import io
import json
import pickle
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem

from recsys.errors import InputError

# a sharded checkpoint (trainer.strategy=torchrec) is a folder: the Lightning checkpoint
# without its weights, and the shards that torch.distributed.checkpoint writes
META_FILE = "meta.pt"
DCP_METADATA_FILE = ".metadata"  # written by torch.distributed.checkpoint, read with pickle


def load_weights_only(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, so a
    checkpoint from elsewhere never runs code here.

    Raises:
        RefusedCheckpoint: the file holds anything else (a class instance, a function).
        UnreadableCheckpoint: the file is not one that ``torch.save`` wrote (damaged, cut
            short, another format).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # a pickled object that could run code
            raise RefusedCheckpoint(path, e) from e
        raise UnreadableCheckpoint(path, e) from e
    except OSError:
        raise  # a missing or unreadable file, named by the error itself
    except Exception as e:  # what torch.load raises on other bytes: RuntimeError, EOFError, ...
        raise UnreadableCheckpoint(path, e) from e


def lightning_checkpoint(checkpoint: Any, path: str | Path, weights: bool = True) -> dict:
    """``checkpoint``, read from ``path``, when it is a training checkpoint: a dict with the
    module's ``hyper_parameters`` (and its ``state_dict`` with ``weights``; a sharded folder's
    ``meta.pt`` has none). Raises `InputError` naming the file otherwise."""
    keys = ("hyper_parameters", "state_dict") if weights else ("hyper_parameters",)
    if isinstance(checkpoint, dict) and all(isinstance(checkpoint.get(k), dict) for k in keys):
        return checkpoint
    if isinstance(checkpoint, dict):
        held = f"a dict of {sorted(map(str, checkpoint))[:8]}"
    else:
        held = f"a {type(checkpoint).__name__}"
    raise InputError(
        f"{path} is not a training checkpoint: it holds {held}, not the {' and '.join(keys)} "
        "that train.py saves; pass a checkpoint written by train.py "
        "(run_dir=<training run folder> serves its best)"
    )


def load_meta(folder: str | Path) -> dict:
    """The ``meta.pt`` of a sharded checkpoint folder (the Lightning checkpoint without its
    weights), read with `load_weights_only`."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise InputError(
            f"{folder} is not a checkpoint folder of trainer.strategy=torchrec (no {META_FILE})"
        )
    return load_weights_only(path)


def load_shards(state: dict, folder: str | Path) -> None:
    """``dcp.load(state, checkpoint_id=folder)`` (each rank reads the shards it owns, in
    place) without running code from the folder: its ``.metadata`` pickle may hold only what
    DCP writes there, and non-tensor entries are read with ``weights_only=True``."""
    folder = Path(folder)
    metadata = folder / DCP_METADATA_FILE
    if metadata.is_file():  # else dcp.load names the missing file
        try:
            with metadata.open("rb") as f:
                _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise RefusedCheckpoint(metadata, e) from e
    try:
        dcp.load(state, checkpoint_id=folder, planner=_WeightsOnlyLoadPlanner())
    except CheckpointException as e:  # on every rank, with every rank's failure
        refused = [exc for exc, _ in e.failures.values() if isinstance(exc, RefusedCheckpoint)]
        if refused:
            raise refused[0] from e
        raise


class RefusedCheckpoint(InputError):
    """A checkpoint file holds something other than tensors and plain containers, or names a
    class from outside the platform (`check_classes`): loading it could run code, so it is
    not loaded."""

    def __init__(self, where: str | Path, error: Exception | None = None, reason: str = ""):
        if reason:
            super().__init__(f"{where} names {reason}")
            return
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = found.group(1) if found else "objects other than tensors and plain containers"
        super().__init__(
            f"{where} holds {what}: recsys never runs code from a checkpoint "
            "(weights_only=True); re-save it with tensors and plain containers only"
        )


_PATHS = {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}


class UnreadableCheckpoint(InputError):
    """A file that ``torch.load`` cannot read: damaged, cut short, or not a checkpoint."""

    def __init__(self, where: str | Path, error: Exception):
        reason = str(error).strip().split(". ")[0].splitlines()[0] if str(error).strip() else ""
        reason = reason if len(reason) <= 100 else reason[:99] + "…"  # torch's first sentence
        super().__init__(
            f"{where} is not a checkpoint that torch.load reads ({type(error).__name__}"
            f"{': ' + reason if reason else ''}): the file is damaged, cut short or of another "
            "format; pass a .ckpt written by train.py (run_dir=<training run folder> serves "
            "its best), or copy the file again"
        )


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``, refusing every global but what DCP writes there: its own
    dataclasses and enums, ``torch.Size``, dtypes and layouts, and paths."""

    def find_class(self, module: str, name: str) -> Any:
        if "." not in name:  # no attribute chains (os.system reached through a module)
            if module.startswith("torch.distributed.checkpoint."):
                found = super().find_class(module, name)
                if isinstance(found, type) and (
                    dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)
                ):
                    return found
            elif (
                (module, name) in {("torch", "Size"), ("torch.serialization", "_get_layout")}
                or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
                or (module in ("pathlib", "pathlib._local") and name in _PATHS)
                or (module, name) == ("collections", "OrderedDict")
            ):
                return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that non-tensor entries (optimizer hyperparameters,
    ...) are unpickled with ``weights_only=True``, not DCP's ``weights_only=False``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise RefusedCheckpoint(f"checkpoint entry {fqn!r}", e) from e
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


# where the classes and functions a checkpoint names may live, by what it names them for
PLATFORM = {
    "net": ("recsys.models",),
    "optimizer": ("torch.optim", "recsys.lit.optim"),  # optimizers and schedules
    "data_class": ("recsys.data",),
}
# the names of earlier versions, as a checkpoint may still give them: old name -> current
RENAMED: dict[str, str] = {}


def check_classes(checkpoint: dict, where: str | Path, trusted: Collection[str] = ()) -> None:
    """Refuse a checkpoint that names a class or function outside this platform.

    A checkpoint names the class of its network (``net``), its optimizers' and schedule's
    ``_target_``s and its dataset's module (``data_class``), and loading it imports and builds
    them. Each must be a class (or a schedule function) of `PLATFORM`'s packages, checked by
    name before any import and then by the object found: its own module lies there too (no
    attribute chains out of them). A ``data_class`` is checked by name only: it is imported
    only to rebuild a missing processed folder. Names of earlier versions (`RENAMED`) are
    rewritten to the current ones in ``checkpoint``. ``trusted``: names accepted wherever they
    live (a user's own network, optimizer or data module).

    Raises:
        RefusedCheckpoint: a name outside `PLATFORM` and ``trusted``.
    """
    hparams = checkpoint.get("hyper_parameters") or {}
    named: list[tuple[str, Mapping, str]] = []  # (kind, where the name is, its key)
    if "net" in hparams:
        named.append(("net", hparams, "net"))
    for key, value in hparams.items():
        for target in _targets(value):
            kind = "optimizer" if key in ("optimizer", "sparse_optimizer", "lr_scheduler") else key
            named.append((kind, target, "_target_"))
    if (state := data_state(checkpoint)) is not None:
        named.append(("data_class", state, "data_class"))
    for kind, holder, key in named:
        name = RENAMED.get(holder[key], holder[key])
        if name not in trusted:
            _check_platform_name(name, PLATFORM.get(kind, ()), kind, where)
        if name != holder[key]:
            holder[key] = name


def data_state(checkpoint: Mapping) -> dict | None:
    """The data module's state in a checkpoint (its ``data_class``, the ``processed`` folder
    and the data ``settings``), or None for a checkpoint without one."""
    found = (v for v in checkpoint.values() if isinstance(v, Mapping) and "data_class" in v)
    return next(found, None)


def _targets(value: Any) -> list[dict]:
    """The mappings with a ``_target_`` in a hyperparameter's value, nested ones included."""
    if isinstance(value, Mapping):
        found = [value] if "_target_" in value else []
        return found + [t for v in value.values() for t in _targets(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _targets(v)]
    return []


def _check_platform_name(name: Any, packages: tuple[str, ...], kind: str, where) -> None:
    """Refuse ``name`` unless it is a callable of ``packages``. A ``data_class`` is checked by
    name alone: its module is imported only where the processed folder is missing, by
    `recsys.runs.data_from_checkpoint`, which takes nothing but a `RecDataModule` from it."""

    def within(module: str) -> bool:
        return any(module == p or module.startswith(p + ".") for p in packages)

    module, _, attr = name.rpartition(".") if isinstance(name, str) else ("", "", "")
    found = None
    if kind == "data_class" and within(module):
        return
    if within(module):
        try:
            found = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            found = None
    if found is None or not callable(found) or not within(getattr(found, "__module__", "")):
        allowed = " or ".join(packages) or "no package"
        raise RefusedCheckpoint(
            where,
            reason=(
                f"{kind} {name!r}, which is not a class of {allowed}: recsys builds only its "
                f"own classes from a checkpoint. If you trust the file and wrote that class, "
                f"pass trusted_classes=[{name}]"
            ),
        )


def checkpoint_state(ckpt_path: Path) -> dict:
    """The Lightning checkpoint of ``ckpt_path`` (``epoch``, ``global_step``, the data module's
    hyperparameters, ...), memory-mapped; a sharded folder's ``meta.pt``. Raises `InputError`
    for a file that is not one (`UnreadableCheckpoint`, `lightning_checkpoint`)."""
    if ckpt_path.is_dir():
        return lightning_checkpoint(load_meta(ckpt_path), ckpt_path, weights=False)
    return lightning_checkpoint(load_weights_only(ckpt_path, mmap=True), ckpt_path)


def checkpoint_from_config(cfg) -> str:
    """The checkpoint a command works on: ``ckpt_path`` when given, else the best checkpoint
    of ``run_dir`` (`best_checkpoint`: the one its test metrics were measured on; ``latest``:
    `latest_run`)."""
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)
    if cfg.get("run_dir"):
        return str(best_checkpoint(run_dir_from_config(cfg)))
    raise InputError("pass run_dir=<training run folder> (or latest) or ckpt_path=<checkpoint>")


def run_dir_from_config(cfg) -> Path:
    """``cfg.run_dir`` as a folder: ``latest`` is `latest_run` under ``paths.log_dir``."""
    if cfg.run_dir == "latest":
        return latest_run(Path(cfg.paths.log_dir) / "train" / "runs")
    return Path(cfg.run_dir)


def latest_run(runs: Path) -> Path:
    """The newest run folder in ``runs`` whose ``metrics.json`` names a best checkpoint: runs
    that crashed or are still training (no metrics.json) and fast_dev_run runs are passed
    over."""
    finished = [
        m.parent
        for m in sorted(runs.glob("*/metrics.json"))
        if json.loads(m.read_text()).get("best_model_path")
    ]
    if not finished:
        raise InputError(
            f"run_dir=latest: no finished training run in {runs} (a folder with a metrics.json "
            "that names a best checkpoint): train one, or pass run_dir=<folder>"
        )
    return finished[-1]


def best_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint named in the run's ``metrics.json``; looked up in the run's own
    ``checkpoints/`` when the run folder has been moved since training."""
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        raise InputError(
            f"run_dir={run_dir} holds no metrics.json: pass the folder of a finished "
            "training run, or ckpt_path=<checkpoint>"
        )
    best = json.loads(metrics_file.read_text()).get("best_model_path")
    if not best:
        raise InputError(
            f"{metrics_file} names no best checkpoint (fast_dev_run or callbacks=none): "
            f"pass ckpt_path={run_dir}/checkpoints/last.ckpt or another checkpoint"
        )
    path = Path(best)
    if not path.exists():
        path = run_dir / "checkpoints" / path.name
    if not path.exists():
        raise InputError(
            f"the best checkpoint {best} of {metrics_file} is gone (nor in {path.parent}): "
            "pass ckpt_path=<checkpoint>"
        )
    return path


def run_folder(ckpt_path: Path) -> Path | None:
    """The training run folder of a checkpoint (the first folder above it that holds
    ``metrics.json`` or ``csv/metrics.csv``), or None for a checkpoint outside a run."""
    for folder in list(ckpt_path.resolve().parents)[:3]:
        if (folder / "metrics.json").is_file() or (folder / "csv" / "metrics.csv").is_file():
            return folder
    return None
