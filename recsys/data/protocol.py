"""The evaluation protocol: what validation and test score, built the same for every run."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader

from recsys.data.loader import BatchLoader, InteractionBatches, batch_sampler, derived_seed
from recsys.data.negatives import PositiveSet
from recsys.data.preprocess import cache_key
from recsys.data.ranking import RANKING_MODES, FullRanking, SampledRanking
from recsys.data.spec import FeatureSpec, SparseFeature
from recsys.data.store import Interactions, ProcessedDataset, RowFeatures

log = logging.getLogger(__name__)

EVAL_SPLITS = ("val", "test")


def diversity_feature(spec: FeatureSpec) -> SparseFeature | None:
    """The item feature whose multi-hot vectors measure intra-list diversity: the first
    multi-hot item feature (genres, tags), or None."""
    return next((f for f in spec.side_features() if f.entity == "item" and f.multi_hot), None)


class EvaluationProtocol:
    """The rows and candidates that validation and test score, and the item statistics that
    beyond-accuracy metrics need.

    - Pointwise: the split's interactions (explicit feedback), or its positives with
      ``num_negatives`` negatives each, sampled once with ``seed`` (implicit feedback).
    - Ranking (``ranking``): ``sampled`` ranks each held-out positive among
      ``ranking_negatives`` distinct negatives, sampled once by `prepare` with a seed of its
      own per split (`candidates_seed`) and saved beside the processed data (the NCF
      protocol), so every model and run ranks the same ones; ``full`` ranks every item not
      among the user's training (and, when testing, validation) interactions.
    - Item statistics: training interactions per item (novelty, the popularity baseline) and
      multi-hot item vectors (intra-list diversity), `item_statistics`.

    The data module builds it from its settings, calls `prepare` in ``prepare_data`` (once per
    node) and `setup` with the loaded data and split rows; its evaluation loaders are this
    protocol's `loaders`.
    """

    def __init__(
        self,
        feedback: str,
        num_negatives: int,
        ranking: str | None,
        ranking_negatives: int,
        seed: int,
        split: dict,
        eval_batch_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_cold_start: bool = False,
        even_eval_shards: bool = False,
    ):
        if ranking not in (None, *RANKING_MODES):
            raise ValueError(f"data.ranking must be null, 'sampled' or 'full', got {ranking!r}")
        self.feedback = feedback
        self.num_negatives = num_negatives
        self.ranking = ranking
        self.ranking_negatives = ranking_negatives
        self.seed = seed
        self.split = split
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.drop_cold_start = drop_cold_start
        # every rank gets as many evaluation rows (strategies whose steps are collective)
        self.even_eval_shards = even_eval_shards
        self.folder: Path | None = None
        self.data: ProcessedDataset | None = None
        self.rows: dict[str, torch.Tensor] = {}
        self._positives: Callable[[], PositiveSet] | None = None
        self._eval_pairs: dict[str, Interactions] = {}

    # --- sampled candidates, built once ----------------------------------------------------
    def candidates_seed(self, split: str) -> int:
        """The seed of ``split``'s candidate draw: derived from (seed, split), so validation and
        test draw independently even where their queries come in the same order."""
        return derived_seed(self.seed, "ranking", split)

    def candidates_path(self, folder: Path, split: str) -> Path:
        """The Parquet file of the sampled ranking candidates of ``split`` in ``folder``."""
        settings = {
            "split": self.split,
            "seed": self.candidates_seed(split),
            "negatives": self.ranking_negatives,
            "feedback": self.feedback,
            "sampling": "distinct",  # each query's negatives are different items
        }
        if self.drop_cold_start:  # other held-out rows, other draws
            settings["drop_cold_start"] = True
        return folder / f"{cache_key(f'ranking-{split}', settings)}.parquet"

    def prepare(
        self,
        folder: Path,
        load: Callable[[], tuple[ProcessedDataset, dict[str, torch.Tensor]]],
    ) -> None:
        """Sample and save the ranking candidates of validation and test in ``folder`` unless
        they are there (``ranking=sampled`` only); ``load`` gives the processed data and its
        split rows, and is called only then."""
        if self.ranking != "sampled":
            return
        missing = [s for s in EVAL_SPLITS if not self.candidates_path(folder, s).exists()]
        if not missing:
            return
        data, rows = load()
        inter = data.interactions
        positives = PositiveSet(inter.users, inter.items, data.spec.num_items)
        for split in missing:
            users, _ = self._held_out(inter, rows[split])
            g = torch.Generator().manual_seed(self.candidates_seed(split))
            negatives = positives.sample(users, self.ranking_negatives, generator=g, distinct=True)
            path = self.candidates_path(folder, split)
            flat = pa.array(negatives.flatten().numpy())
            table = pa.table(
                {
                    "user": users.numpy(),
                    "negatives": pa.FixedSizeListArray.from_arrays(flat, self.ranking_negatives),
                }
            )
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            pq.write_table(table, tmp)
            os.replace(tmp, path)
            log.info("%s ranking candidates: %d queries, wrote %s", split, len(users), path)

    def _candidates(self, split: str, users: torch.Tensor) -> torch.Tensor:
        """[Q, ranking_negatives] saved negatives of each held-out positive of ``split``."""
        path = self.candidates_path(self.folder, split)
        if not path.exists():
            raise RuntimeError(
                f"no sampled ranking candidates in {path}: call the data module's "
                "prepare_data() before asking for the ranking loaders"
            )
        table = pq.read_table(path)
        saved = torch.from_numpy(table.column("user").to_numpy().copy())
        if not torch.equal(saved, users):
            raise RuntimeError(
                f"{path} holds candidates of other {split} rows than these ({len(saved)} "
                f"queries, here {len(users)}): delete it and run prepare_data() again"
            )
        return torch.from_numpy(
            np.array(table.column("negatives").combine_chunks().flatten(), dtype=np.int64)
        ).view(table.num_rows, self.ranking_negatives)

    # --- loaded data ------------------------------------------------------------------------
    def setup(
        self,
        folder: Path,
        data: ProcessedDataset,
        rows: dict[str, torch.Tensor],
        positives: Callable[[], PositiveSet],
    ) -> None:
        """The loaded processed data (in ``folder``), its split rows, and what gives every
        known (user, item) pair (excluded from the sampled negatives), called only when
        negatives are sampled: the pair set is as large as several interaction columns."""
        self.folder, self.data, self.rows, self._positives = folder, data, rows, positives
        self._eval_pairs = {}
        self._popularity = None

    def setup_stream(self, data: ProcessedDataset, popularity: torch.Tensor | None) -> None:
        """Streamed data: the processed data without its interactions, and the training
        interactions per item counted when the shards were written (None: no items)."""
        self.setup(None, data, {}, None)
        self._popularity = popularity

    @property
    def positives(self) -> PositiveSet | None:
        """Every known (user, item) pair (built on first use), None before `setup`."""
        return None if self._positives is None else self._positives()

    def _check_setup(self) -> None:
        if self.data is None:
            raise RuntimeError("call the data module's setup() before asking for evaluation data")

    def eval_pairs(self, split: str) -> Interactions:
        """The (user, item, label) rows scored in ``val`` or ``test``.

        Explicit feedback: the split's interactions. Implicit feedback: its positives followed
        by ``num_negatives`` negatives per positive, sampled once (seeded), so every model and
        run is scored on the same pairs.
        """
        self._check_setup()
        inter, rows = self.data.interactions, self.rows[split]
        if self.feedback == "explicit":
            return inter.take(rows)
        if split not in self._eval_pairs:
            users, items = inter.users[rows], inter.items[rows]
            g = torch.Generator().manual_seed(self.seed + (1 if split == "val" else 2))
            negatives = self.positives.sample(users, self.num_negatives, generator=g).flatten()
            n, m = len(rows), len(negatives)
            self._eval_pairs[split] = Interactions(
                users=torch.cat([users, users.repeat_interleave(self.num_negatives)]),
                items=torch.cat([items, negatives]),
                labels=torch.cat([torch.ones(n), torch.zeros(m)]),
                ratings=torch.cat([inter.ratings[rows], torch.full((m,), float("nan"))]),
                timestamps=torch.cat([inter.timestamps[rows], torch.full((m,), -1)]),
            )
        return self._eval_pairs[split]

    def loaders(self, split: str) -> DataLoader | list[DataLoader]:
        """The loaders of ``val`` or ``test``: the pointwise one, and with ``ranking`` the
        ranking one after it."""
        if self.ranking is None:
            return self.pointwise_loader(split)
        return [self.pointwise_loader(split), self.ranking_loader(split)]

    def pointwise_loader(self, split: str) -> DataLoader:
        pairs = self.eval_pairs(split)
        sampler = batch_sampler(
            torch.arange(len(pairs)),
            self.eval_batch_size,
            shuffle=False,
            even_shards=self.even_eval_shards,
        )
        dataset = InteractionBatches(pairs, self.data.features)
        return BatchLoader(dataset, sampler, self.num_workers, self.pin_memory)

    def ranking_loader(self, split: str) -> DataLoader:
        """Batches of `RankingBatch` queries of ``split`` (``ranking`` sampled or full)."""
        self._check_setup()
        inter = self.data.interactions
        users, items = self._held_out(inter, self.rows[split])
        if self.ranking == "sampled":
            negatives = self._candidates(split, users)
            dataset = SampledRanking(self.data.features, users, items, negatives)
            per_query = 1 + self.ranking_negatives
        else:
            seen_rows = self.rows["train"]
            if split == "test":
                seen_rows = torch.cat([seen_rows, self.rows["val"]])
            num_items = self.data.spec.num_items
            dataset = FullRanking(
                self.data.features,
                users.unique(),
                held_out=PositiveSet(users, items, num_items),
                seen=PositiveSet(inter.users[seen_rows], inter.items[seen_rows], num_items),
                num_items=num_items,
            )
            per_query = num_items
        sampler = batch_sampler(
            torch.arange(len(dataset)),
            max(1, self.eval_batch_size // per_query),
            shuffle=False,
            even_shards=self.even_eval_shards,
        )
        return BatchLoader(dataset, sampler, self.num_workers, self.pin_memory)

    @staticmethod
    def _held_out(inter: Interactions, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Users and items of the positive rows among ``rows``: the ranking queries."""
        held_out = rows[inter.labels[rows] > 0]
        return inter.users[held_out], inter.items[held_out]

    def describe(self) -> dict:
        """What decides the rows and candidates the test scores: feedback, negatives, the
        ranking mode and, sampled, the file of the test's saved candidates."""
        out = {
            "feedback": self.feedback,
            "num_negatives": self.num_negatives if self.feedback == "implicit" else None,
            "seed": self.seed,
            "ranking": self.ranking,
            "drop_cold_start": self.drop_cold_start,
        }
        if self.ranking == "sampled":
            out["ranking_negatives"] = self.ranking_negatives
            out["candidates"] = self.candidates_path(Path("."), "test").name
        return out

    # --- item statistics --------------------------------------------------------------------
    def item_popularity(self) -> torch.Tensor:
        """Training interactions per item [num_items] (popularity baseline, novelty)."""
        self._check_setup()
        if self._popularity is not None:  # streamed
            return self._popularity
        if not self.data.spec.has_ids:
            return torch.zeros(0)
        items = self.data.interactions.items[self.rows["train"]]
        return torch.bincount(items, minlength=self.data.spec.num_items).float()

    def item_vectors(self) -> torch.Tensor | None:
        """Multi-hot [num_items, V] of the `diversity_feature` (genres, tags), for intra-list
        diversity; None when items have none."""
        self._check_setup()
        spec = self.data.spec
        f = diversity_feature(spec)
        if f is None:
            return None
        items = torch.arange(spec.num_items)
        row = RowFeatures.unknown(spec, len(items)) if self.data.features.needs_row else None
        batch = self.data.features.make_batch(torch.zeros_like(items), items, row=row)
        kjt = batch.sparse_features[f.name]
        rows = torch.repeat_interleave(items, kjt.lengths())
        vectors = torch.zeros(spec.num_items, f.num_embeddings)
        vectors[rows, kjt.values()] = 1.0
        return vectors

    def item_statistics(self) -> dict[str, torch.Tensor | None]:
        """``{"popularity": [num_items], "vectors": [num_items, V] or None}``: what
        `RecommenderModule.set_item_statistics` takes."""
        return {"popularity": self.item_popularity(), "vectors": self.item_vectors()}
