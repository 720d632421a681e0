"""Where a training step's time goes: the platform's Trainer against a loop without Lightning,
over the same module, data and optimizer.

    python benchmarks/step_cost.py [batches=[1280,4096]] [steps=200] [rounds=8] [threads=2]
        [modes=[loop,platform]] [quick=true] [results=benchmarks/results] [hydra overrides]

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
over rounds of the difference within a round (`recsys.bench.alternating_rounds`; this machine's
speed drifts by more over a few minutes than most of the differences measured here). Hydra
overrides go to every mode's config. ``quick=true``: ml-100k, 1,280 samples, one round of 30
steps (a smoke test). Results: ``<results>/step_cost.json`` (`recsys.bench`).
"""

from __future__ import annotations

import contextlib
import operator
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from training import compose_run

from recsys import bench
from recsys.bench import Settings
from recsys.train import build


@dataclass
class Options(Settings):
    batches: list[int] = field(default_factory=lambda: [1280, 4096])
    steps: int = 200
    rounds: int = 8
    threads: int = 2
    modes: list[str] | None = None  # a subset of MODES, e.g. [loop,platform]; None: all
    out: str = "logs/benchmarks/step_cost"


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
# the paired differences printed below the table when every mode runs: (mode, baseline)
SHARES = [
    ("Trainer", "loop"),
    ("platform", "Trainer"),
    ("platform", "platform, no progress bar"),
    ("platform", "platform, no logger"),
]


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


def main(run: bench.Benchmark) -> None:
    opts = run.settings
    torch.set_num_threads(opts.threads)
    out = Path(opts.out).resolve()
    modes = list(opts.modes or MODES)
    if unknown := set(modes) - set(MODES):
        raise ValueError(f"modes={modes}: unknown {sorted(unknown)}; choose among {list(MODES)}")
    for batch in opts.batches:

        def measure(mode: str, batch: int = batch) -> dict[str, float]:
            overrides = [
                "trainer=cpu",
                "trainer.max_epochs=1",
                f"+trainer.limit_train_batches={opts.steps}",
                "+trainer.limit_val_batches=0",
                f"paths.output_dir={out}/{batch}",
                *(MODES[mode] or []),
                *run.overrides,
            ]
            cfg = compose_run(opts.quick, overrides, batch)
            return (run_loop if MODES[mode] is None else run_trainer)(cfg)

        runs = bench.alternating_rounds(modes, opts.rounds, measure)
        where = {"batch": batch, "steps": opts.steps, "threads": opts.threads}
        for mode, rounds in runs.items():
            for phase in PHASES:
                values = [r[phase] for r in rounds]
                run.add(
                    system=mode,
                    model="NeuMF",
                    metric=f"{phase}_ms",
                    unit="ms",
                    value=bench.median(values),
                    settings=where,
                    statistic="median",
                    runs=values,
                )
        pairs = [(mode, modes[0]) for mode in modes[1:]]
        pairs += [p for p in SHARES if p not in pairs and set(p) <= set(modes)]
        for mode, baseline in pairs:
            run.add_paired(
                [r["step"] for r in runs[mode]],
                [r["step"] for r in runs[baseline]],
                operator.sub,
                system=mode,
                model="NeuMF",
                metric="step_ms_difference",
                unit="ms",
                settings={**where, "baseline": baseline},
            )
    print_tables(run.rows, opts, modes)
    run.write()


def print_tables(rows: list[dict], opts: Options, modes: list[str]) -> None:
    """The table it prints, from the results' rows."""
    data = "ml-100k" if opts.quick else "the ml-1m subset"
    print(
        f"NeuMF on {data}, {opts.threads} threads; median ms a step over {opts.rounds} "
        f"round(s) of {opts.steps} steps per mode\n"
    )

    def ms(mode: str, metric: str, batch: int, **where) -> float:
        return bench.find(rows, system=mode, metric=metric, batch=batch, **where)["value"]

    for batch in opts.batches:
        print(f"effective batch {batch:,}\n")
        print(f"| mode | {' | '.join(PHASES)} | samples/s | step against {modes[0]} |")
        print(f"| --- | {' | '.join('---:' for _ in PHASES)} | ---: | ---: |")
        for mode in modes:
            cells = " | ".join(f"{ms(mode, f'{p}_ms', batch):.2f}" for p in PHASES)
            rate = batch / ms(mode, "step_ms", batch) * 1e3
            diff = (
                ""
                if mode == modes[0]
                else f"{ms(mode, 'step_ms_difference', batch, baseline=modes[0]):+.2f}"
            )
            print(f"| {mode} | {cells} | {rate:,.0f} | {diff} |")
        if set(modes) == set(MODES):
            d = {p: ms(p[0], "step_ms_difference", batch, baseline=p[1]) for p in SHARES}
            print(
                f"\nPaired (the median over rounds of the difference within a round), ms a step: "
                f"Lightning's Trainer {d[SHARES[0]]:+.2f} against the loop; the platform's "
                f"callbacks and logger {d[SHARES[1]]:+.2f} against the Trainer, of which the "
                f"progress bar {d[SHARES[2]]:+.2f} and the CSV logger {d[SHARES[3]]:+.2f}\n"
            )


if __name__ == "__main__":
    main(bench.start("step_cost", Options, __doc__, quick=QUICK))
