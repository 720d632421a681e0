"""Where a training step's time goes: the platform's Trainer against a loop without Lightning,
over the same module, data and optimizer.

    python benchmarks/step_cost.py [batches=[1280,4096]] [steps=200] [rounds=8] [quick=true]

The work of `benchmarks/training.py` (NeuMF, leave-one-out on the ml-1m subset, 4 negatives
per positive, Adam at lr 0.001; ``batches`` are effective batches in samples). Each mode
builds the run with `recsys.train.build` (the data module, the module and its optimizer as
``train.py`` makes them) and takes ``steps`` training steps:

- ``loop``: no Lightning: the next batch from the data module's training loader, the module's
  forward and binary cross-entropy, backward, the optimizer of its ``configure_optimizers``,
  ``zero_grad``. What a step has to do, without the bookkeeping of the module's
  ``training_step`` (the epoch's loss, ``self.log``), which needs a Trainer;
- ``Trainer``: ``Trainer.fit`` with no callbacks (but `ValidationHistory`, which ``build``
  always adds), no logger, no progress bar, no checkpointing;
- ``platform``: the Trainer as ``train.py`` makes it (``trainer=cpu``: the default callbacks
  and the CSV logger; validation off), as `benchmarks/training.py` times it;
- ``platform, no progress bar`` and ``platform, no logger``: the same without
  ``callbacks.progress_bar`` or with ``logger=none``.

Each step is cut into phases by timestamps (hooks of a callback in the Trainer, the clock in
the loop): ``batch`` (the previous step's end to this one's start: loading and moving the
batch, and the Trainer's work between steps), ``training_step`` (forward, loss and the
module's bookkeeping), ``zero_grad``, ``backward``, ``optimizer`` (gradient clipping and the
optimizer's update), and ``step`` (all of them). The modes run in alternating rounds in one
process; each figure is the median over rounds of the round's median over its steps (the
first 10 steps of a round left out), and the differences between modes are paired: the median
over rounds of the difference within a round (this machine's speed drifts by more over a few
minutes than most of the differences measured here). ``quick=true``: ml-100k, 1,280
samples, one round of 30 steps (a smoke test).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training import DATA, NEGATIVES, QUICK_DATA, compose_train  # noqa: E402

from recsys.train import build  # noqa: E402

DEFAULTS = {
    "batches": [1280, 4096],
    "steps": 200,
    "rounds": 8,
    "threads": 2,
    "modes": None,  # a subset of MODES, e.g. [loop,platform]; None: all
    "quick": False,
    "out": "logs/benchmarks/step_cost",
}
QUICK = {"batches": [1280], "steps": 30, "rounds": 1}
WARMUP = 10  # steps of a round left out of its median
# the Trainer's hooks that end each phase, in the order they run (automatic optimization: the
# training step, then zero_grad, backward, and the optimizer's update)
MARKS = ["start", "training_step", "zero_grad", "backward", "clipping", "optimizer"]
PHASES = ["batch", "training_step", "zero_grad", "backward", "optimizer", "step"]
BARE_TRAINER = [
    "callbacks=none",
    "logger=none",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_checkpointing=false",
    "+trainer.enable_model_summary=false",
]
MODES = {
    "loop": None,
    "Trainer": BARE_TRAINER,
    "platform": [],
    "platform, no progress bar": ["~callbacks.progress_bar", "+trainer.enable_progress_bar=false"],
    "platform, no logger": ["logger=none"],
}


class StepClock(L.Callback):
    """Timestamps of each training step's phases (`MARKS`)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def _mark(self, name: str) -> None:
        self.steps[-1][name] = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append({"start": time.perf_counter()})

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        self._mark("training_step")

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._mark("zero_grad")

    def on_after_backward(self, trainer, pl_module) -> None:
        self._mark("backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._mark("clipping")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._mark("optimizer")


def phases(steps: list[dict[str, float]]) -> dict[str, float]:
    """Median ms of each phase over the steps after the warm-up; a step's ``batch`` phase
    runs from the previous step's end to its start."""
    rows = []
    for before, step in zip(steps[WARMUP:], steps[WARMUP + 1 :], strict=False):
        t = [step[m] for m in MARKS]
        rows.append(
            [
                step["start"] - before["optimizer"],
                t[1] - t[0],
                t[2] - t[1],
                t[3] - t[2],
                t[5] - t[3],  # clipping and the update
                step["start"] - before["start"],
            ]
        )
    return dict(zip(PHASES, np.median(np.array(rows), axis=0) * 1e3, strict=True))


def run_loop(cfg) -> dict[str, float]:
    dm, model, _ = build(cfg)
    optimizer = model.configure_optimizers()
    batches = iter(dm.train_dataloader())
    clock = []
    for _ in range(cfg.trainer.limit_train_batches):
        batch = next(batches)
        t = {"start": time.perf_counter()}  # the batch phase: from the previous step's end
        loss = F.binary_cross_entropy_with_logits(model(batch), batch.labels)
        t["training_step"] = time.perf_counter()
        optimizer.zero_grad()
        t["zero_grad"] = time.perf_counter()
        loss.backward()
        t["backward"] = t["clipping"] = time.perf_counter()
        optimizer.step()
        t["optimizer"] = time.perf_counter()
        clock.append(t)
    return phases(clock)


def run_trainer(cfg) -> dict[str, float]:
    dm, model, trainer = build(cfg)
    clock = StepClock()
    trainer.callbacks.append(clock)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        trainer.fit(model, datamodule=dm)  # the progress bar's lines (on stdout)
    return phases(clock.steps)


def main(opts) -> None:
    torch.set_num_threads(opts.threads)
    data = QUICK_DATA if opts.quick else DATA
    out = Path(opts.out).resolve()
    print(
        f"NeuMF on {'ml-100k' if opts.quick else 'the ml-1m subset'}, {opts.threads} threads; "
        f"median ms a step over {opts.rounds} round(s) of {opts.steps} steps per mode\n"
    )
    modes = list(opts.modes or MODES)
    if unknown := set(modes) - set(MODES):
        sys.exit(f"unknown modes {sorted(unknown)}; choose among {list(MODES)}")
    for batch in opts.batches:
        runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
        for round_ in range(opts.rounds):
            order = modes if round_ % 2 == 0 else modes[::-1]
            for mode in order:
                overrides = [
                    f"data.batch_size={batch // (1 + NEGATIVES)}",
                    "trainer=cpu",
                    "trainer.max_epochs=1",
                    f"+trainer.limit_train_batches={opts.steps}",
                    "+trainer.limit_val_batches=0",
                    f"paths.output_dir={out}/{batch}",
                    *(MODES[mode] or []),
                ]
                cfg = compose_train(data, overrides)
                run = run_loop if MODES[mode] is None else run_trainer
                runs[mode].append(run(cfg))
        print(f"effective batch {batch:,} ({batch // (1 + NEGATIVES):,} positives)\n")
        print(f"| mode | {' | '.join(PHASES)} | samples/s | step against {modes[0]} |")
        print(f"| --- | {' | '.join('---:' for _ in PHASES)} | ---: | ---: |")
        for mode, rounds in runs.items():
            cells = " | ".join(f"{statistics.median(r[p] for r in rounds):.2f}" for p in PHASES)
            rate = batch / statistics.median(r["step"] for r in rounds) * 1e3
            diff = paired(runs, mode, modes[0])
            print(f"| {mode} | {cells} | {rate:,.0f} | {diff:+.2f} |")
        if set(modes) == set(MODES):
            print(
                f"\nPaired (the median over rounds of the difference within a round), ms a step: "
                f"Lightning's Trainer {paired(runs, 'Trainer', 'loop'):+.2f} against the loop; "
                f"the platform's callbacks and logger {paired(runs, 'platform', 'Trainer'):+.2f} "
                "against the Trainer, of which the progress bar "
                f"{paired(runs, 'platform', 'platform, no progress bar'):+.2f} and the CSV logger "
                f"{paired(runs, 'platform', 'platform, no logger'):+.2f}\n"
            )


def paired(runs: dict[str, list[dict[str, float]]], mode: str, baseline: str) -> float:
    """The median over rounds of mode's step time less baseline's in the same round (ms)."""
    pairs = zip(runs[mode], runs[baseline], strict=True)
    return statistics.median(a["step"] - b["step"] for a, b in pairs)


if __name__ == "__main__":
    opts = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli())
    if opts.quick:
        opts = OmegaConf.merge(opts, QUICK)
    main(opts)
