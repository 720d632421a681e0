"""data.streaming=true on ml-100k: the shards hold the split rows, the seeded block-and-row
shuffle, each rank's disjoint share with the rows left out counted, exact mid-epoch resume,
shards read through the cache from another folder, and evaluation equal to the in-memory one."""

from __future__ import annotations

import logging
import shutil
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

import recsys.data.stream as stream
from recsys.train import build, run
from tests.conftest import compose_train
from tests.test_resume import KILL_AT_STEP, _train

# 80,000 training rows in 14 blocks of 6,000 (the last holds 2,000), read two blocks at a time
BLOCKS = ["data.block_rows=6000", "data.window_blocks=2"]
COMMON = ["data=movielens", "data.variant=100k", "data.batch_size=1000", *BLOCKS]
TRAIN_ROWS = 80_000


def _module(data_dir, cache_dir, output_dir, *overrides: str):
    cfg = compose_train(data_dir, cache_dir, output_dir, *COMMON, *overrides)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def streamed(data_dir, cache_dir, tmp_path_factory):
    return _module(data_dir, cache_dir, tmp_path_factory.mktemp("s"), "data.streaming=true")


@pytest.fixture(scope="module")
def in_memory(data_dir, cache_dir, tmp_path_factory):
    return _module(data_dir, cache_dir, tmp_path_factory.mktemp("m"))


@pytest.fixture(scope="module")
def streamed_implicit(data_dir, cache_dir, tmp_path_factory):
    return _module(
        data_dir,
        cache_dir,
        tmp_path_factory.mktemp("i"),
        "data.streaming=true",
        "data.feedback=implicit",
        "data.num_negatives=2",
    )


def _keys(users: torch.Tensor, items: torch.Tensor, labels: torch.Tensor | None = None):
    """One int64 per (user, item[, label]) row; ml-100k has under 2,000 items."""
    key = users.long() * 2_000 + items.long()
    return key if labels is None else key * 2 + labels.long()


def _batch_keys(batch) -> torch.Tensor:
    return _keys(batch.ids("user_id"), batch.ids("item_id"))


def _stored(dm, split: str) -> torch.Tensor:
    """(user, item, label) keys of ``split``'s shards in stored order (no shuffle, one rank)."""
    loader = dm._stream(split, shuffle=False, even=False)
    return torch.cat([_keys(b.ids("user_id"), b.ids("item_id"), b.labels) for b in loader])


def _as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(stream, "_rank_and_world", lambda: (rank, world))


# --- what the shards hold -------------------------------------------------------------------
def test_shards_hold_every_split_row_exactly_once(streamed, in_memory):
    assert streamed.manifest["splits"]["train"] == {"rows": TRAIN_ROWS, "blocks": 14}
    inter = in_memory.data.interactions
    for split in ("train", "val", "test"):
        rows = (
            inter.take(in_memory.rows["train"])
            if split == "train"
            else in_memory.protocol.eval_pairs(split)
        )
        expected = _keys(rows.users, rows.items, rows.labels).sort().values
        got = _stored(streamed, split)
        assert len(got) == len(expected) == streamed.manifest["splits"][split]["rows"], split
        assert torch.equal(got.sort().values, expected), split


def test_training_rows_are_not_held_in_memory(streamed):
    """Streamed, the data module holds the tables and the manifest, not the interactions;
    the loader holds a window of blocks at a time."""
    assert streamed.data.interactions is None and streamed.rows == {}
    seen = []
    real = stream.concat

    def recording(parts):
        out = real(parts)
        seen.append(len(out))
        return out

    stream.concat, restore = recording, real
    try:
        next(iter(streamed.train_dataloader()))
    finally:
        stream.concat = restore
    assert max(seen) <= 2 * 6000  # window_blocks blocks, not the 80,000 rows


def test_known_pairs_under_streaming_from_the_id_columns(streamed, in_memory):
    """`positives` (every known pair: evaluation candidates, predictions) and
    `train_positives` (the sampler's exclusions) under streaming equal the in-memory ones."""
    for name in ("positives", "train_positives"):
        got, expected = getattr(streamed, name), getattr(in_memory, name)
        users = torch.arange(streamed.spec.num_users).repeat_interleave(8)
        items = torch.randint(0, streamed.spec.num_items, (len(users),))
        assert torch.equal(got.contains(users, items), expected.contains(users, items)), name
    assert streamed.data.interactions is None  # still: only the id columns were read


# --- the shuffle ----------------------------------------------------------------------------
def _order(dm, seed: int | None = None, epoch: int = 0) -> list[torch.Tensor]:
    loader = dm.train_dataloader()
    if seed is not None:
        loader.dataset.seed = seed
    loader.epoch = lambda: epoch
    return [_batch_keys(b) for b in loader]


def test_seeded_shuffle_over_blocks_and_within_batches(streamed):
    first, again = _order(streamed), _order(streamed)
    assert len(first) == len(again) == TRAIN_ROWS // 1000
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other_seed, other_epoch = _order(streamed, seed=7), _order(streamed, epoch=1)
    for other in (other_seed, other_epoch):
        assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
        # the same rows, every one once
        assert torch.equal(torch.cat(other).sort().values, torch.cat(first).sort().values)

    stored = _stored(streamed, "train") // 2  # (user, item) keys, in stored order
    position = torch.full((int(stored.max()) + 1,), -1)
    position[stored] = torch.arange(len(stored))
    where = [position[b] for b in first]
    assert all(bool((w >= 0).all()) for w in where)
    # within the batch: not a sorted slice, and drawn from both blocks of its window
    blocks = [w // 6000 for w in where]
    assert sum(not bool((w.diff() > 0).all()) for w in where) == len(where)
    assert all(len(b.unique()) == 2 for b in blocks[:10])
    # over blocks: the windows do not come in stored order
    window_blocks = [tuple(b.unique().tolist()) for b in blocks]
    assert window_blocks != sorted(window_blocks)


# --- each rank's share ----------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_disjoint_shares_and_count_what_they_leave_out(
    streamed, monkeypatch, caplog, world
):
    """World 2: 7 blocks a rank; world 3: 4 blocks a rank and 2 given to no rank, whose rows
    are counted (by rank 0) among the rows left out."""
    every = _stored(streamed, "train") // 2
    shares, steps, left_out = [], [], []
    for rank in range(world):
        _as_rank(monkeypatch, rank, world)
        loader = streamed.train_dataloader()
        with caplog.at_level(logging.INFO, logger="recsys.data.stream"):
            batches = [_batch_keys(b) for b in loader]
        shares.append(torch.cat(batches))
        steps.append((len(loader), len(batches)))
        left_out.append(loader.dataset.left_out)
    assert len({s for pair in steps for s in pair}) == 1  # len() == yielded, on every rank
    for share in shares:
        assert len(share.unique()) == len(share)  # every row at most once
    union = torch.cat(shares)
    assert len(union.unique()) == len(union)  # disjoint
    assert bool(torch.isin(union, every).all())
    assert sum(left_out) == TRAIN_ROWS - len(union) > 0
    logged = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(logged) == sum(n > 0 for n in left_out)
    if world == 3:  # rank 0 counts the two blocks no rank was given
        assert left_out[0] >= 2 * 2000 and "in blocks given to no rank" in logged[0]


@pytest.mark.parametrize("world", [2, 3])
def test_evaluation_shares_cover_every_row_once(streamed, monkeypatch, world):
    every = (_stored(streamed, "val") // 2).sort().values
    shares = []
    for rank in range(world):
        _as_rank(monkeypatch, rank, world)
        shares += [_batch_keys(b) for b in streamed.val_dataloader()]
    union = torch.cat(shares).sort().values
    assert torch.equal(union, every)


@pytest.mark.parametrize("block_rows", [7000, 30000])
@pytest.mark.parametrize("batch_size", [999, 4096])
def test_steps_equal_the_batches_every_rank_yields(
    in_memory, monkeypatch, tmp_path, block_rows, batch_size
):
    """On shards of other block sizes, for 1 to 4 ranks: `len` of the loader is the number of
    batches each rank yields, and the rows a rank leaves out plus the rows read are all."""
    rows = in_memory.data.interactions.take(in_memory.rows["train"])
    writer = stream.ShardWriter(tmp_path / "train", in_memory.spec, block_rows)
    writer.add(rows)
    manifest = {"block_rows": block_rows, "splits": {"train": writer.close()}}
    for world in range(1, 5):
        if manifest["splits"]["train"]["blocks"] < world:
            continue
        read, left_out = 0, 0
        for rank in range(world):
            _as_rank(monkeypatch, rank, world)
            dataset = stream.StreamBatches(
                str(tmp_path / "train"),
                None,
                manifest,
                "train",
                in_memory.spec,
                in_memory.data.features,
                batch_size,
                shuffle=True,
                seed=3,
                window_blocks=1,
                even=True,
            )
            loader = stream.StreamLoader(dataset, lambda: 0)
            sizes = [len(b.labels) for b in loader]
            assert len(sizes) == len(loader), (world, rank)
            read, left_out = read + sum(sizes), left_out + dataset.left_out
        assert read + left_out == TRAIN_ROWS, world


def test_a_split_of_fewer_blocks_than_ranks_is_refused(streamed, monkeypatch):
    _as_rank(monkeypatch, 0, 3)
    loader = streamed._stream("val", shuffle=False, even=True)  # 2 blocks
    with pytest.raises(ValueError, match="block_rows"):
        len(loader)


# --- exact resume ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("module", "rank", "world"),
    [("streamed", 0, 1), ("streamed_implicit", 0, 1), ("streamed", 1, 2), ("streamed", 2, 3)],
)
def test_loader_state_resumes_mid_epoch_exactly(request, monkeypatch, module, rank, world):
    """After 13 batches (in the second window) of epoch 2, a fresh loader given the state
    yields exactly the batches (rows, labels and sampled negatives) the first yields next,
    on one rank of several too."""
    dm = request.getfixturevalue(module)
    _as_rank(monkeypatch, rank, world)
    loader = dm.train_dataloader()
    loader.epoch = lambda: 2
    batches = iter(loader)
    for _ in range(13):
        next(batches)
    state = loader.state_dict()
    assert state["epoch"] == 2 and state["batch"] == 13 and state["window"] == 1
    rest = list(batches)

    fresh = dm.train_dataloader()
    fresh.epoch = lambda: 2
    fresh.load_state_dict(state)
    again = list(fresh)
    assert len(again) == len(rest) == len(loader) - 13
    for a, b in zip(rest, again, strict=True):
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
        assert torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())
        assert torch.equal(a.labels, b.labels)
    assert fresh.state_dict() == loader.state_dict()


# --- shards read from elsewhere -------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["folder", "file"])
def test_shards_url_a_folder_or_file_url_read_through_the_cache(
    data_dir, cache_dir, streamed, tmp_path, scheme
):
    remote = tmp_path / "remote"
    shutil.copytree(streamed.shards_dir, remote)
    url = str(remote) if scheme == "folder" else f"file://{remote}"
    local = cache_dir / "stream" / streamed.shards_dir.name
    shutil.rmtree(local, ignore_errors=True)
    dm = _module(
        data_dir,
        cache_dir,
        tmp_path,
        "data.streaming=true",
        f"data.shards_url={url}",
        "data.stream_cache_size=1GB",
    )
    loader = dm.train_dataloader()
    assert loader.dataset.max_cache_size == "1GB"
    keys = torch.cat([_batch_keys(b) for b in loader])
    assert torch.equal(keys.sort().values, (_stored(streamed, "train") // 2).sort().values)
    assert list((local / "train").rglob("chunk-*.bin"))  # copied through the cache


# --- evaluation -----------------------------------------------------------------------------
def test_streamed_evaluation_equals_in_memory_on_the_same_weights(data_dir, cache_dir, tmp_path):
    cfg = compose_train(
        data_dir,
        cache_dir,
        tmp_path,
        *COMMON,
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=10",
        "callbacks.early_stopping=null",
        "callbacks.last_checkpoint=null",
    )
    with open_dict(cfg):
        cfg.callbacks.pop("best_checkpoint", None)
    dm, model, trainer = build(cfg)
    trainer.fit(model, datamodule=dm)
    cfg.data.streaming = True
    streamed = instantiate(cfg.data)
    streamed.prepare_data()
    streamed.setup()
    for split, evaluate in (("val", trainer.validate), ("test", trainer.test)):
        memory = evaluate(model, datamodule=dm, verbose=False)[0]
        shards = evaluate(model, datamodule=streamed, verbose=False)[0]
        key = f"{split}/auroc"
        assert 0.5 < memory[key] < 1
        assert shards[key] == pytest.approx(memory[key], abs=1e-6), split


# --- slow: two processes, kill -9 -----------------------------------------------------------
class RecordRows(L.Callback):
    """Saves the (user, item) keys each rank trained on in the first epoch."""

    def __init__(self, folder: str):
        self.folder, self.keys = folder, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0:
            self.keys.append(_batch_keys(batch).cpu())

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            torch.save(torch.cat(self.keys), Path(self.folder) / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_two_gloo_processes_stream_disjoint_shares(make_cfg, tmp_path):
    cfg = make_cfg(
        *COMMON,
        "data.streaming=true",
        "trainer=ddp_spawn",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=1",
        "callbacks.early_stopping=null",
    )
    with open_dict(cfg):
        cfg.callbacks["record"] = {"_target_": f"{__name__}.RecordRows", "folder": str(tmp_path)}
    metrics = run(cfg)
    assert 0.5 < metrics["test/auroc"] < 1
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert len(r0) == len(r1) and not set(r0.tolist()) & set(r1.tolist())
    assert len(set(r0.tolist()) | set(r1.tolist())) == len(r0) + len(r1) >= 0.8 * TRAIN_ROWS


@pytest.mark.slow
@pytest.mark.parametrize(
    "feedback",
    [
        ["data.feedback=explicit", "model.dropout=0.2"],
        ["data.feedback=implicit", "data.num_negatives=2"],  # negatives drawn per batch
    ],
    ids=["explicit", "implicit"],
)
def test_streamed_sigkill_mid_epoch_then_resume_equals_uninterrupted(
    data_dir, cache_dir, tmp_path, feedback
):
    """As tests/test_resume.py (20 batches of 4,000 a epoch, a checkpoint every 4 steps,
    SIGKILL at step 27), streamed from blocks of 6,000 rows read two at a time."""
    overrides = [*feedback, "data.streaming=true", *BLOCKS]
    whole = _train(data_dir, cache_dir, tmp_path / "whole", *overrides)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _train(
        data_dir,
        cache_dir,
        tmp_path / "killed",
        *overrides,
        "+callbacks.kill._target_=tests.test_resume.KillAtStep",
        f"+callbacks.kill.step={KILL_AT_STEP}",
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == 24 and state["epoch"] == 1
    # the streamed loader's position (after 4 batches of the second epoch) is in last.ckpt
    position = {"epoch": 1, "batch": 4, "block": 2, "window": 1, "offset": 4000}
    assert str(position)[1:-1] in str(state["loops"])
    resumed = _train(data_dir, cache_dir, tmp_path / "resumed", *overrides, f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)
    got = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
