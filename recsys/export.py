"""A checkpoint as a model file that runs without recsys: ``torch.export`` (``.pt2``, loaded
with ``torch.export.load``) or ONNX (``.onnx``, run with onnxruntime).

    python -m recsys.export ckpt_path=<checkpoint> | run_dir=<training run> format=onnx|torch_export
        [output=<file>] [atol=1e-5]

The file takes plain tensors and returns the logits [B] of B (user, item) pairs:

- ``pairs`` inputs, for models that read the ids only (NeuMF in every variant, MF, Hybrid
  without side features): ``user_id`` int64 [B] and ``item_id`` int64 [B],
  the codes of the pairs' users and items. ``<output>.user_ids.parquet`` and
  ``.item_ids.parquet`` map raw dataset ids (``user_id``/``item_id``, strings) to codes.
- ``features`` inputs, for models that read side or dense features (DLRM, Hybrid with side
  features, logistic regression): the flattened `Batch` that
  `recsys.data.store.FeatureStore.make_batch` builds: ``dense_features`` float32 [B, Dd],
  ``sparse_values`` int64 [N] (every sparse feature's values, feature by feature, pair by
  pair) and ``sparse_lengths`` int32 [F, B] (the values per feature and pair), the sparse
  features in the order ``<output>.json`` names. A wrapper module builds the
  ``KeyedJaggedTensor`` inside ``forward``, so the exported graph takes plain tensors.

``<output>.json`` describes the inputs, the output, the checkpoint and the parity check:
after writing, the file is loaded back as a user would load it and run on a batch of real
rows of the checkpoint's data (the test split's first ``parity_rows``); its logits must
equal the checkpoint's within ``atol``, else the command exits non-zero naming the largest
difference (`ParityError`).

Formats per model: NeuMF (every variant), MF, Hybrid without side features and DLRM (TorchRec's
embedding tables) in both; EASE and ItemKNN in neither (their forward gathers a user's
history, of a length that depends on the data); a model whose ops a format cannot express
is refused with the exporter's reason (`ExportUnsupported`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from torch import nn
from torch.export import Dim
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.checkpoint import checkpoint_from_config
from recsys.console import quiet_libraries
from recsys.data.batch import Batch
from recsys.errors import InputError, UserError, exit_on_user_error, require_extra
from recsys.models.neighbors import ItemItem
from recsys.models.protocols import Factorised
from recsys.runs import load_checkpoint

log = logging.getLogger(__name__)

FORMATS = {"torch_export": ".pt2", "onnx": ".onnx"}
ONNX_INLINE_BYTES = 1 << 30  # larger models keep their ONNX weights in <output>.data


def _nbytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


class ParityError(UserError):
    """The exported file's logits differ from the checkpoint's by more than the tolerance."""


class ExportUnsupported(InputError):
    """A model whose ops the format cannot express."""


def _batch(dense: torch.Tensor, keys: list[str], values: torch.Tensor, lengths: torch.Tensor):
    """A `Batch` of plain tensors; the offsets computed here (a cumulative sum), not by
    TorchRec's own kernel, which neither ONNX nor a plain torch install has."""
    lengths = lengths.reshape(-1)
    offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
    kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, offsets=offsets)
    return Batch(dense, kjt, dense.new_zeros(dense.shape[0]))


class PairsModel(nn.Module):
    """logits [B] of a net that reads ids only, from ``user_id`` and ``item_id`` codes [B]."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, user_id: torch.Tensor, item_id: torch.Tensor) -> torch.Tensor:
        lengths = torch.ones(2 * user_id.shape[0], dtype=torch.int32)
        dense = torch.zeros(user_id.shape[0], 0)
        values = torch.cat([user_id, item_id])
        return self.net(_batch(dense, ["user_id", "item_id"], values, lengths))


class FeaturesModel(nn.Module):
    """logits [B] of any net, from a flattened `Batch`: ``dense_features`` [B, Dd],
    ``sparse_values`` [N] and ``sparse_lengths`` [F, B] of the sparse features ``keys``."""

    def __init__(self, net: nn.Module, keys: list[str]):
        super().__init__()
        self.net, self.keys = net, list(keys)

    def forward(
        self,
        dense_features: torch.Tensor,
        sparse_values: torch.Tensor,
        sparse_lengths: torch.Tensor,
    ) -> torch.Tensor:
        return self.net(_batch(dense_features, self.keys, sparse_values, sparse_lengths))


def reads_ids_only(net: nn.Module) -> bool:
    """Whether the net reads the user and item ids only: its logit factors into user and
    item parts (`recsys.scoring.CatalogueScorer`), which no side or dense feature enters."""
    return isinstance(net, Factorised) and net.factorised


def exportable(net: nn.Module, batch: Batch) -> tuple[nn.Module, dict, dict]:
    """The wrapper module of ``net`` (`PairsModel` or `FeaturesModel`), its example inputs
    (name -> tensor) from ``batch`` and the description of each input.

    Raises:
        ExportUnsupported: EASE and ItemKNN, whose forward gathers each user's training
            history (a length that depends on the data), which neither format expresses.
    """
    if isinstance(net, ItemItem):
        raise ExportUnsupported(
            f"{type(net).__name__} scores a pair by gathering the user's training items (a "
            "length that depends on the data), which neither torch.export nor ONNX "
            "expresses: serve it with python -m recsys.serve, or export its item-item "
            "weights W [I, I] (net.W) and score X_u W where it runs"
        )
    if reads_ids_only(net):
        inputs = {"user_id": batch.ids("user_id"), "item_id": batch.ids("item_id")}
        about = {
            "user_id": "int64 [B]: user codes (see user_ids.parquet)",
            "item_id": "int64 [B]: item codes (see item_ids.parquet)",
        }
        return PairsModel(net).eval(), inputs, about
    kjt = batch.sparse_features
    keys = list(kjt.keys())
    inputs = {
        "dense_features": batch.dense_features.float(),
        "sparse_values": kjt.values(),
        "sparse_lengths": kjt.lengths().to(torch.int32).view(len(keys), -1),
    }
    about = {
        "dense_features": f"float32 [B, {inputs['dense_features'].shape[1]}]: the pairs' dense "
        "features",
        "sparse_values": f"int64 [N]: the values of the sparse features {keys}, feature by "
        "feature, pair by pair",
        "sparse_lengths": f"int32 [{len(keys)}, B]: how many values each feature has per pair",
    }
    return FeaturesModel(net, keys).eval(), inputs, about


def dynamic_shapes(inputs: dict) -> dict:
    """The batch dimension (and the values' count) of each input, free in the exported graph."""
    batch, values = Dim("batch"), Dim("values")
    shapes = {
        "user_id": {0: batch},
        "item_id": {0: batch},
        "dense_features": {0: batch},
        "sparse_values": {0: values},
        "sparse_lengths": {1: batch},
    }
    return {name: shapes[name] for name in inputs}


def write(model: nn.Module, inputs: dict, fmt: str, output: Path) -> None:
    """Export ``model`` on example ``inputs`` into ``output`` as ``fmt``.

    Raises:
        ExportUnsupported: the exporter cannot express the model's ops in ``fmt``.
    """
    args, shapes = tuple(inputs.values()), dynamic_shapes(inputs)
    try:
        if fmt == "torch_export":
            program = torch.export.export(model, args, dynamic_shapes=shapes, strict=False)
            program = program.run_decompositions(_complete_cumsum_decomposition())
            require_plain_torch(program, type(model.net).__name__)
            torch.export.save(program, output)
        else:
            torch.onnx.export(
                model,
                args,
                output,
                input_names=list(inputs),
                output_names=["logits"],
                dynamic_shapes=shapes,
                dynamo=True,
                verbose=False,
                # weights in the file itself, unless over protobuf's 2 GB: <output>.data then
                external_data=_nbytes(model) > ONNX_INLINE_BYTES,
                custom_translation_table=onnx_translations(),
            )
    except (RuntimeError, torch.onnx.errors.OnnxExporterError) as e:
        net = type(model.net).__name__
        # the exporter's own summary line ("No ONNX function found for ..."), else its first
        lines = [ln for ln in str(e).splitlines() if "Error'>:" in ln] or str(e).splitlines()
        raise ExportUnsupported(
            f"format={fmt} cannot express {net}: {lines[0].strip()}"
            + (" (try format=torch_export)" if fmt == "onnx" else "")
        ) from e


def _complete_cumsum(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


def _complete_cumsum_decomposition() -> dict:
    """The default decompositions plus fbgemm's ``asynchronous_complete_cumsum`` (which a
    ``KeyedJaggedTensor`` calls when a model reads a feature by key) in plain torch ops, so a
    ``.pt2`` loads where fbgemm is not installed."""
    table = torch.export.default_decompositions()
    table[torch.ops.fbgemm.asynchronous_complete_cumsum.default] = _complete_cumsum
    return table


def require_plain_torch(program: torch.export.ExportedProgram, net: str) -> None:
    """Raise `ExportUnsupported` when the exported graph calls ops outside torch's own
    (``aten``, ``prims``): loading it would need the library that registers them."""
    foreign = sorted(
        {
            str(node.target)
            for node in program.graph.nodes
            if node.op == "call_function"
            and isinstance(node.target, torch._ops.OpOverload)
            and node.target.namespace not in ("aten", "prims")
        }
    )
    if foreign:
        raise ExportUnsupported(
            f"format=torch_export: {net}'s graph calls {foreign}, which torch alone cannot "
            "load; export a model whose ops are torch's own"
        )


def onnx_translations() -> dict:
    """ONNX translations of the TorchRec kernels that a ``KeyedJaggedTensor`` calls when a
    model reads a feature by key (fbgemm's ``asynchronous_complete_cumsum``: the offsets of
    lengths, a cumulative sum with a leading 0), which the exporter has none of."""
    require_extra("export", "onnx", "onnxscript")
    from onnxscript import opset18 as op

    def complete_cumsum(lengths):
        zero = op.CastLike(op.Constant(value_ints=[0]), lengths)
        return op.Concat(zero, op.CumSum(lengths, op.Constant(value_int=0)), axis=0)

    return {torch.ops.fbgemm.asynchronous_complete_cumsum.default: complete_cumsum}


def run_exported(path: Path, fmt: str, inputs: dict) -> np.ndarray:
    """The logits of an exported file on ``inputs``, loaded as a user loads it:
    ``torch.export.load`` or an onnxruntime session."""
    if fmt == "torch_export":
        with torch.inference_mode():
            return torch.export.load(path).module()(*inputs.values()).numpy()
    require_extra("export", "onnxruntime")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0]


def check_parity(got: np.ndarray, expected: np.ndarray, atol: float, path: Path) -> float:
    """The largest difference of the exported logits from the checkpoint's.

    Raises:
        ParityError: it is above ``atol`` (or the shapes differ).
    """
    if got.shape != expected.shape:
        raise ParityError(f"{path} gives logits of shape {got.shape}, expected {expected.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
    if not diff <= atol:  # NaN fails too
        raise ParityError(
            f"{path} differs from the checkpoint by up to {diff:.3g} on {len(got)} real rows "
            f"(atol={atol:g}): the export is not faithful; do not use it"
        )
    return diff


def parity_rows(dm, count: int) -> torch.Tensor:
    """The first ``count`` rows of the test split (of the training rows when it is empty)."""
    for split in ("test", "val", "train"):
        rows = dm.rows.get(split)
        if rows is not None and len(rows):
            return rows[:count]
    raise InputError("the checkpoint's data has no rows to check the export on")


def run(cfg: DictConfig) -> dict:
    """Export ``cfg.ckpt_path`` (or ``run_dir``'s best checkpoint) as ``cfg.format`` into
    ``cfg.output`` (default: ``<paths.output_dir>/model.pt2|.onnx``), with the id maps and
    ``<output>.json`` beside it, and check parity; returns the files and the largest
    difference."""
    quiet_libraries()
    for name in ("onnx_ir", "onnxscript"):  # the ONNX exporter's passes log at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    if cfg.format not in FORMATS:
        raise InputError(f"format={cfg.format!r} is not one of {list(FORMATS)}")
    cfg.ckpt_path = checkpoint_from_config(cfg)
    dm, model = load_checkpoint(cfg)
    net = model.net.eval()
    output = Path(cfg.output or Path(cfg.paths.output_dir) / f"model{FORMATS[cfg.format]}")
    if output.suffix != FORMATS[cfg.format]:
        suffix = FORMATS[cfg.format]
        raise InputError(f"output={output}: format={cfg.format} writes a {suffix} file")
    output.parent.mkdir(parents=True, exist_ok=True)

    rows = parity_rows(dm, cfg.parity_rows)
    if dm.data.features.needs_row:
        raise ExportUnsupported(
            f"{cfg.ckpt_path}: the model reads row features (data.row_features), which the "
            "exported pairs cannot carry: export models of data without row features"
        )

    def batch_of(sample: torch.Tensor) -> Batch:
        inter = dm.data.interactions
        if not dm.spec.has_ids:
            return dm.data.features.make_batch(None, None)
        return dm.data.features.make_batch(inter.users[sample], inter.items[sample])

    wrapper, inputs, about = exportable(net, batch_of(rows))
    output.with_name(f"{output.name}.data").unlink(missing_ok=True)  # an earlier export's
    write(wrapper, inputs, cfg.format, output)
    diff = 0.0
    # the rows it was exported on, and a batch of another size (the batch dimension is free)
    for sample in (rows, rows[: len(rows) // 2 + 1]):
        batch = batch_of(sample)
        with torch.inference_mode():
            expected = net(batch).numpy()
        got = run_exported(output, cfg.format, exportable(net, batch)[1])
        diff = max(diff, check_parity(got, expected, cfg.atol, output))

    files = {"model": str(output)}
    weights = output.with_name(f"{output.name}.data")  # ONNX's external data, kept beside it
    if cfg.format == "onnx" and weights.is_file():
        files["weights"] = str(weights)
    if dm.spec.has_ids:
        for kind, raw in (("user", dm.data.user_ids), ("item", dm.data.item_ids)):
            path = output.with_name(f"{output.name}.{kind}_ids.parquet")
            frame = pd.DataFrame({f"{kind}_id": np.asarray(raw).astype(str)})
            frame["code"] = np.arange(len(frame), dtype=np.int64)
            frame.to_parquet(path, index=False)
            files[f"{kind}_ids"] = str(path)
    card = {
        "format": cfg.format,
        "load": (
            "torch.export.load(path).module()(*inputs)"
            if cfg.format == "torch_export"
            else "onnxruntime.InferenceSession(path).run(['logits'], inputs)"
        ),
        "inputs": about,
        "output": "logits float32 [B]: the model's logit of each pair",
        "sparse_keys": wrapper.keys if isinstance(wrapper, FeaturesModel) else None,
        "files": {k: Path(v).name for k, v in files.items()},
        "checkpoint": str(cfg.ckpt_path),
        "net": model.hparams.net,
        "data": {"source": dm.source, "processed": dm.processed_dir.name},
        "parity": {"rows": len(rows), "max_abs_diff": diff, "atol": cfg.atol},
    }
    card_path = output.with_name(f"{output.name}.json")
    card_path.write_text(json.dumps(card, indent=2))
    files["card"] = str(card_path)
    log.info(
        "exported %s as %s to %s: logits within %.3g of the checkpoint's on %d real rows",
        cfg.ckpt_path,
        cfg.format,
        output,
        diff,
        len(rows),
    )
    return {**files, "max_abs_diff": diff, "ckpt_path": str(cfg.ckpt_path)}


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
