"""Batch building alone: training batches a second from the data module's loader, no model.

    python benchmarks/batch_building.py [batches=[4096,20480]] [epochs=3] [threads=2]
        [device=cpu] [quick=true] [results=benchmarks/results] [hydra overrides]

The data of `benchmarks/training.py` (``experiment=ncf_protocol`` on the shared ml-1m: implicit
feedback, 4 negatives per training positive; ``batches`` are effective batches in samples) and
its loader as ``train.py`` makes it (`RecDataModule.train_dataloader`), on ``device``: ``cpu``,
or ``cuda`` (``data.device=cuda``: the data and the batch building on the GPU, each epoch's
time taken after a ``torch.cuda.synchronize``). Each figure is samples per second of the
fastest of ``epochs`` whole epochs (shuffle, gathers, negatives, the KeyedJaggedTensor), so
the machine's other work counts as little as it can. ``quick=true``: ml-100k, one epoch.
Results: ``<results>/batch_building.json``, with ``device=cuda`` ``batch_building_cuda.json``
(`recsys.bench`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import lightning as L
import torch
from training import compose_run

from recsys import bench


@dataclass
class Options(bench.Settings):
    batches: list[int] = field(default_factory=lambda: [4096, 20480])
    epochs: int = 3
    threads: int = 2
    device: str = "cpu"  # or cuda


QUICK = {"batches": [1280], "epochs": 1}


def epoch_seconds(loader, epochs: int, cuda: bool) -> tuple[list[float], int]:
    """(each epoch's seconds, samples an epoch) of iterating ``loader``."""
    times, samples = [], 0
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        start, samples = time.perf_counter(), 0
        for batch in loader:
            samples += len(batch)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, samples


def main(run: bench.Benchmark) -> None:
    from hydra.utils import instantiate

    opts = run.settings
    if opts.device != "cpu":
        run.name = f"batch_building_{opts.device}"
    torch.set_num_threads(opts.threads)
    cuda = opts.device == "cuda"
    for batch in opts.batches:
        device = [] if opts.device == "cpu" else [f"data.device={opts.device}"]  # cpu: auto
        overrides = ["logger=none", *device, *run.overrides]
        cfg = compose_run(opts.quick, overrides, batch)
        dm = instantiate(cfg.data)
        dm.prepare_data()
        dm.setup()
        if cuda:  # the data module asks its Trainer which device the run trains on
            dm.trainer = L.Trainer(accelerator="gpu", devices=1, logger=False)
        seconds_each, samples = epoch_seconds(dm.train_dataloader(), opts.epochs, cuda)
        seconds = min(seconds_each)
        rate = samples / seconds
        print(f"{batch:,}: {samples:,} samples in {seconds:.3f} s, {rate:,.0f}/s", flush=True)
        run.add(
            system="recsys",
            model="batches",
            metric="samples_per_sec",
            unit="samples/s",
            value=rate,
            settings={"batch": batch, "threads": opts.threads, "device": opts.device},
            statistic="max",
            runs=[samples / s for s in seconds_each],
        )
    run.write()


if __name__ == "__main__":
    main(bench.start("batch_building", Options, __doc__, quick=QUICK))
