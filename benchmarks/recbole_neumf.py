"""RecBole 1.2.1's NeuMF on given training pairs: one timed training epoch, printed as JSON.

Runs in RecBole's own virtual environment (`benchmarks/training.py` makes it and calls this
script with its interpreter); it imports nothing from recsys.

    <venv>/bin/python benchmarks/recbole_neumf.py PAIRS.npz WORKDIR BATCH EPOCHS THREADS

``PAIRS.npz`` holds int64 ``users`` and ``items`` (the training positives) and
``num_items``. They are written as RecBole atomic files split into train, valid and test by
``benchmark_filename`` (the valid and test files hold one pair per user, as leave-one-out
does; they are never evaluated here), so RecBole trains on exactly these pairs: NeuMF with
``mf_embedding_size`` 32, ``mlp_embedding_size`` 128, ``mlp_hidden_size`` [128, 64, 32],
4 uniform negatives per positive (RecBole samples them among each user's non-positives),
Adam, binary cross-entropy. RecBole's ``train_batch_size`` counts samples (positives and
negatives), as the effective batch does. Each epoch is timed around ``Trainer._train_epoch``:
RecBole's own data loader, negative sampling and optimisation, no validation. RecBole's test
phase is not run (it loads the saved checkpoint with ``torch.load``, which torch >= 2.6
refuses without ``weights_only=False``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.model.general_recommender import NeuMF
from recbole.trainer import Trainer
from recbole.utils import init_seed


def write_atomic(pairs: np.lib.npyio.NpzFile, folder: Path) -> None:
    users, items = pairs["users"], pairs["items"]
    # one held-out pair per user for RecBole's valid and test files (never evaluated)
    last = np.unique(users, return_index=True)[1]
    folder.mkdir(parents=True, exist_ok=True)
    for split, (u, i) in {
        "train": (users, items),
        "valid": (users[last], items[last]),
        "test": (users[last], items[last]),
    }.items():
        lines = "\n".join(f"{a}\t{b}" for a, b in zip(u.tolist(), i.tolist(), strict=True))
        (folder / f"ml.{split}.inter").write_text(f"user_id:token\titem_id:token\n{lines}\n")


def main(pairs_path: str, workdir: str, batch: int, epochs: int, threads: int) -> None:
    torch.set_num_threads(threads)
    work = Path(workdir)
    write_atomic(np.load(pairs_path), work / "ml")
    config = Config(
        model=NeuMF,
        dataset="ml",
        config_dict={
            "data_path": str(work),
            "benchmark_filename": ["train", "valid", "test"],
            "load_col": {"inter": ["user_id", "item_id"]},
            "user_inter_num_interval": "[0,inf)",
            "item_inter_num_interval": "[0,inf)",
            "train_neg_sample_args": {"distribution": "uniform", "sample_num": 4},
            "train_batch_size": batch,
            "eval_batch_size": 4096,
            "mf_embedding_size": 32,
            "mlp_embedding_size": 128,
            "mlp_hidden_size": [128, 64, 32],
            "dropout_prob": 0.0,
            "learner": "adam",
            "learning_rate": 0.001,
            "epochs": epochs,
            "use_gpu": False,
            "device": "cpu",
            "show_progress": False,
            "checkpoint_dir": str(work / "saved"),
            "log_wandb": False,
            "state": "WARNING",
        },
    )
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    model = NeuMF(config, train_data.dataset).to(config["device"])
    trainer = Trainer(config, model)
    seconds, losses = [], []
    for epoch in range(epochs):
        start = time.perf_counter()
        loss = trainer._train_epoch(train_data, epoch)
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss) / len(train_data))
    samples = train_data.dataset.inter_num * 5  # each training positive and its 4 negatives
    print(
        json.dumps(
            {
                "samples": samples,
                "seconds": seconds,
                "samples_per_sec": samples * epochs / sum(seconds),
                "loss": losses[-1],
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    path, workdir, batch, epochs, threads = sys.argv[1:6]
    main(path, workdir, int(batch), int(epochs), int(threads))
