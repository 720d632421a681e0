"""The device path: batches built where the data is, and steps that read nothing back from the
device. On a GPU a host read (``.item()``, ``.tolist()``, a boolean mask, ``torch.unique``)
waits for every queued kernel; here, on the CPU, `NoHostReads` fails on the operations that
would make one, so the property is checked without a GPU."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data import loader as loader_module
from recsys.data.identity import FREE_KEYS
from recsys.data.loader import WINDOW, data_device
from recsys.data.ranking import RankingBatch
from recsys.errors import InputError
from recsys.models import common
from recsys.train import build

aten = torch.ops.aten


class HostRead(AssertionError):
    """An operation that reads a tensor's data back on the host, or whose output size its
    data decides: on a GPU it waits for the device."""


# read a value on the host
_READS = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal}
# output sizes decided by the data (the host learns them by reading it)
_DATA_SIZED = {
    aten.nonzero,
    aten.argwhere,
    aten.masked_select,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.unique_dim_consecutive,
    aten.bincount,  # its size is the largest value
}


def _packet(func):
    return getattr(func, "overloadpacket", func)


class NoHostReads(TorchDispatchMode):
    """Raises `HostRead` on every operation that would synchronise with a CUDA device: scalar
    reads, data-sized outputs, boolean-mask indexing, ``repeat_interleave`` without its
    ``output_size``; and (patched, since on the CPU they dispatch nothing) ``tolist``,
    ``numpy`` and ``cpu``. ``allowed_reads`` ``tolist`` calls are let through and counted."""

    def __init__(self, allowed_reads: int = 0):
        super().__init__()
        self.reads = 0
        self.allowed = allowed_reads
        self._patch = pytest.MonkeyPatch()

    def __enter__(self):
        tolist = torch.Tensor.tolist

        def counted_tolist(t):
            self.reads += 1
            if self.reads > self.allowed:
                raise HostRead(f"tolist() of a {tuple(t.shape)} tensor")
            return tolist(t)

        def refused(name):
            def method(t, *args, **kwargs):
                raise HostRead(f"{name}() of a {tuple(t.shape)} tensor")

            return method

        self._patch.setattr(torch.Tensor, "tolist", counted_tolist)
        for name in ("numpy", "cpu"):
            self._patch.setattr(torch.Tensor, name, refused(name))
        return super().__enter__()

    def __exit__(self, *exc):
        self._patch.undo()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = _packet(func)
        if packet in _READS or packet in _DATA_SIZED:
            raise HostRead(str(func))
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            raise HostRead(f"{func} without output_size")
        if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype == torch.bool for i in indices):
                raise HostRead(f"{func} with a boolean mask")
        return func(*args, **kwargs)


def _normalize_as_on_a_device(tensor, normalization):
    """torchmetrics' `normalize_logits_if_needed` as it runs off the CPU (a ``torch.where``;
    on the CPU it tests the range on the host)."""
    if not normalization:
        return tensor
    normalized = tensor.sigmoid() if normalization == "sigmoid" else tensor.softmax(1)
    return torch.where(((tensor < 0) | (tensor > 1)).any(), normalized, tensor)


@pytest.fixture
def accelerator_path(monkeypatch):
    """The code that branches on the device takes its accelerator branch on the CPU: the
    models (no ``torch.unique``, no gathers by ``index_select`` chosen for CPU speed) and
    torchmetrics' probability check."""
    monkeypatch.setattr(common, "host_reads_are_free", lambda t: False)
    for name in ("stat_scores", "precision_recall_curve"):
        module = importlib.import_module(f"torchmetrics.functional.classification.{name}")
        monkeypatch.setattr(module, "normalize_logits_if_needed", _normalize_as_on_a_device)


def _kjt():
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"], values=torch.arange(5), lengths=torch.tensor([1, 1, 2, 1])
    )


@pytest.mark.parametrize(
    "read",
    [
        lambda t: t.sum().item(),
        lambda t: int(t.sum()),
        lambda t: bool(t.any()),
        lambda t: t[t > 2],
        lambda t: torch.unique(t),
        lambda t: t.nonzero(),
        lambda t: t.tolist(),
        lambda t: torch.repeat_interleave(t, t),
        lambda t: torch.bincount(t),
        lambda t: _kjt(),  # sums the lengths of each key on the host
    ],
    ids=["item", "int", "bool", "mask", "unique", "nonzero", "tolist", "repeat", "bincount", "kjt"],
)
def test_the_guard_fails_on_host_reads(monkeypatch, read):
    t = torch.arange(5)
    with pytest.raises(HostRead), NoHostReads():
        read(t)


def test_the_guard_lets_device_work_through(monkeypatch):
    t = torch.arange(6)
    with NoHostReads():
        out = torch.repeat_interleave(t, t, output_size=15)
        out = out[torch.searchsorted(out, t)].cumsum(0) + torch.randperm(6)
    assert len(out) == 6


def _fit_parts(make_cfg, model: str, feedback: str, *overrides: str):
    cfg = make_cfg(
        "data=movielens",
        "data.variant=100k",
        f"data.feedback={feedback}",
        "data.batch_size=64",
        f"model={model}",
        "trainer.log_every_n_steps=1000",
        *overrides,
    )
    dm, module, trainer = build(cfg)
    module.trainer = trainer  # what training_step reads (the step counter, logging interval)
    return dm, module


MODELS = ["ncf", "dlrm", "hybrid"]


@pytest.mark.parametrize("feedback", ["explicit", "implicit"])
@pytest.mark.parametrize("model", MODELS)
def test_training_step_reads_nothing_back(make_cfg, monkeypatch, accelerator_path, model, feedback):
    """Forward, loss (BCE, and BPR under implicit feedback) and the epoch's loss sum."""
    overrides = ["model.loss=bpr"] if feedback == "implicit" and model != "dlrm" else []
    dm, module = _fit_parts(make_cfg, model, feedback, *overrides)
    batch = next(iter(dm.train_dataloader()))
    with NoHostReads():
        loss = module.training_step(batch, 0)
        loss = module.training_step(batch, 1)
    assert loss.requires_grad and torch.isfinite(loss)


def test_the_cpu_path_of_neumf_reads_back(make_cfg, monkeypatch):
    """The check can fail: NeuMF's CPU path takes the distinct ids of a batch
    (``torch.unique``), which on a GPU would wait for the device."""
    dm, module = _fit_parts(make_cfg, "ncf", "explicit")
    batch = next(iter(dm.train_dataloader()))
    with pytest.raises(HostRead, match="unique"), NoHostReads():
        module.training_step(batch, 0)


def test_a_deliberate_item_in_the_step_fails(make_cfg, monkeypatch, accelerator_path):
    dm, module = _fit_parts(make_cfg, "dlrm", "explicit")
    batch = next(iter(dm.train_dataloader()))
    forward = module.net.forward
    monkeypatch.setattr(module.net, "forward", lambda b: forward(b) + 0 * forward(b).sum().item())
    with pytest.raises(HostRead, match="_local_scalar_dense"), NoHostReads():
        module.training_step(batch, 0)


@pytest.mark.parametrize("feedback", ["explicit", "implicit"])
def test_batches_read_back_once_per_window(make_cfg, monkeypatch, feedback):
    """Batch building (shuffle, gathers, negatives, the KJT) reads one thing back per window
    of batches: the value counts of the multi-hot features (ml-100k's genres)."""
    dm, _ = _fit_parts(make_cfg, "dlrm", feedback)
    loader = dm.train_dataloader()
    assert len(loader) > 2 * WINDOW
    with NoHostReads(allowed_reads=2) as guard:
        batches = list(itertools.islice(iter(loader), 2 * WINDOW))
    assert guard.reads == 2 and len(batches) == 2 * WINDOW


def test_data_without_multi_hot_features_reads_nothing_back(make_cfg, monkeypatch):
    dm, _ = _fit_parts(make_cfg, "ncf", "implicit")
    loader = dm.train_dataloader()
    dataset = loader.dataset
    without = {n: t for n, t in dataset.features._tables.items() if t.offsets is None}
    monkeypatch.setattr(dataset.features, "_tables", without)
    with NoHostReads():
        batches = list(itertools.islice(iter(loader), WINDOW + 1))
    assert batches[0].sparse_features.keys() == list(without)


def _same(a, b) -> bool:
    ka, kb = a.sparse_features, b.sparse_features
    return (
        ka.keys() == kb.keys()
        and ka.length_per_key() == kb.length_per_key()
        and torch.equal(ka.values(), kb.values())
        and torch.equal(ka.lengths(), kb.lengths())
        and torch.equal(a.dense_features, b.dense_features)
        and torch.equal(a.labels, b.labels)
        and a.num_negatives == b.num_negatives
    )


@pytest.mark.parametrize("feedback", ["explicit", "implicit"])
def test_windows_build_the_batches_one_builds_alone(make_cfg, feedback):
    """Loader workers build one batch at a time (``ds[index]``); without workers the loader
    builds windows: the same batches, bit for bit, with the KJT's per-key lengths those that
    `KeyedJaggedTensor.from_lengths_sync` computes."""
    dm, _ = _fit_parts(make_cfg, "dlrm", feedback)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(3)
    windowed = list(itertools.islice(iter(loader), WINDOW + 3))
    alone = [loader.dataset[i] for i in itertools.islice(iter(loader.sampler), WINDOW + 3)]
    assert all(_same(a, b) for a, b in zip(windowed, alone, strict=True))
    for batch in windowed[:3]:
        kjt = batch.sparse_features
        synced = KeyedJaggedTensor.from_lengths_sync(kjt.keys(), kjt.values(), kjt.lengths())
        assert kjt.length_per_key() == synced.length_per_key()
        assert kjt.offset_per_key() == synced.offset_per_key()
    if feedback == "implicit":
        assert windowed[0].num_negatives == dm.num_negatives


def test_data_device_setting():
    cpu = torch.device("cpu")
    assert data_device("auto", cpu, 10) == cpu
    assert data_device("cpu", torch.device("cuda", 0), 10) == cpu
    with pytest.raises(InputError, match="needs a CUDA accelerator"):
        data_device("cuda", cpu, 10)
    with pytest.raises(InputError, match="data.num_workers=0"):
        data_device("cuda", torch.device("cuda", 0), 10, workers=2)
    with pytest.raises(InputError, match="one of"):
        data_device("gpu", cpu, 10)
    assert "device" in FREE_KEYS  # where batches are built is no part of the data


def test_auto_takes_the_gpu_when_the_data_fits(monkeypatch):
    class Props:
        total_memory = 1000

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    gpu = torch.device("cuda", 1)
    assert data_device("auto", gpu, 249) == gpu
    assert data_device("auto", gpu, 250) == torch.device("cpu")  # loader_module.AUTO_SHARE
    assert loader_module.AUTO_SHARE == 0.25
    assert data_device("auto", gpu, 10, workers=2) == torch.device("cpu")


def test_the_config_has_the_key(make_cfg):
    assert make_cfg("data=movielens").data.device == "auto"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("feedback", ["explicit", "implicit"])
def test_batches_are_built_on_the_gpu(make_cfg, feedback):
    cfg = make_cfg(
        "data=movielens",
        "data.variant=100k",
        f"data.feedback={feedback}",
        "trainer=gpu",
        "trainer.accelerator=gpu",  # after make_cfg's trainer.accelerator=cpu
        "data.device=cuda",
        "trainer.max_steps=3",
    )
    dm, module, trainer = build(cfg)
    trainer.fit(module, datamodule=dm)
    batch = next(iter(dm.train_dataloader()))
    assert batch.labels.is_cuda and batch.sparse_features.values().is_cuda


@pytest.mark.parametrize(
    ("model", "ranking"), [("ncf", "sampled"), ("ncf", "full"), ("dlrm", "sampled")]
)
def test_evaluation_steps_read_nothing_back(make_cfg, accelerator_path, model, ranking):
    """Validation and test steps over pointwise and ranking batches: scores, masks, top-K
    lists and metric updates stay on the device until the epoch's end."""
    dm, module = _fit_parts(
        make_cfg, model, "implicit", "data.split.kind=leave_one_out", f"data.ranking={ranking}"
    )
    module.on_validation_epoch_start()
    module.on_test_epoch_start()
    for loaders, step in (
        (dm.val_dataloader(), module.validation_step),
        (dm.test_dataloader(), module.test_step),
    ):
        batches = [next(iter(loader)) for loader in loaders]
        with torch.no_grad(), NoHostReads():
            for i, batch in enumerate(batches):
                step(batch, 0, dataloader_idx=i)
                step(batch, 1, dataloader_idx=i)
    assert isinstance(batches[1], RankingBatch)
    assert module.val_ranking.update_called and module.test_ranking.update_called


def test_copies_moved_to_a_device_build_the_same_batches(make_cfg):
    """What ``train_dataloader`` moves to a GPU (`FeatureStore.to`, `Interactions.to`,
    `PositiveSet.to`), here moved to the CPU: every table comes along, and the batches match."""
    from recsys.data.loader import BatchIndexSampler
    from recsys.data.negatives import NegativeSamplingBatches

    dm, _ = _fit_parts(make_cfg, "dlrm", "implicit")
    data, positives = dm.data, dm.train_positives
    moved = NegativeSamplingBatches(
        data.interactions.to("cpu"), data.features.to("cpu"), positives.to("cpu"), 4
    )
    original = NegativeSamplingBatches(data.interactions, data.features, positives, 4)
    indices = list(itertools.islice(BatchIndexSampler(dm.rows["train"], 64, shuffle=True), 3))
    pairs = zip(moved.batches(indices), original.batches(indices), strict=True)
    assert all(_same(a, b) for a, b in pairs)
    assert data.interactions.to("cpu").ratings.stride(0) == data.interactions.ratings.stride(0)
    assert data.features.nbytes > 0 and positives.nbytes > 0 and data.interactions.nbytes > 0
