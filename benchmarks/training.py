"""Training throughput: the platform against a bare PyTorch loop and RecBole 1.2.1, same work.

    python benchmarks/training.py [quick=true] [batches=[1280,4096,20480]] [epochs=1]
        [threads=2] [recbole=true] [device=cpu] [repeats=3] [out=logs/benchmarks/training]
        [results=benchmarks/results] [hydra overrides]

The work: NeuMF (GMF 32, MLP on 2 x 128 embeddings with layers 128-64-32), leave-one-out on the
shared ml-1m (``experiment=ncf_protocol`` with ``data.split.val_row=previous``: implicit
feedback, each user's last two interactions held out), 4 uniform negatives per training
positive (never one of the user's training items), the platform's optimizer (``model.optimizer``:
fused Adam at lr 0.001), binary cross-entropy, one epoch = every training positive and its
negatives. ``batches`` are effective batches in samples (positives and negatives): the
platform's ``data.batch_size`` is ``batch / (1 + data.num_negatives)``. Hydra overrides go to
the config that both the platform and the bare loop take their model, data and optimizer from.

Three systems train it, each in a fresh process with ``threads`` torch threads:

- ``bare``: `benchmarks/bare_neumf.py`, a hand-written vectorised loop (nn.Embedding, every
  negative of the epoch drawn in one call) with the platform's optimizer:
  `recsys.bench.reference_optimizer` copies the class and settings of the optimizer that
  the platform's ``configure_optimizers`` builds for the same config;
- ``recsys``: the platform's own path, `recsys.train.build` and ``Trainer.fit`` with the
  default callbacks and logger, validation off; the figure is the `SamplesPerSecond` callback's;
- ``RecBole 1.2.1``: `benchmarks/recbole_neumf.py` in RecBole 1.2.1's own virtual environment,
  made on first use under ``<paths.cache_dir>/recbole-1.2.1`` (RecBole 1.2.1 needs numpy<2,
  pandas<2.2 and setuptools<81; torch is the version installed here), trained on the very
  training pairs of the platform, with RecBole's own Adam (torch's defaults).

Each figure is samples per second over the epochs' wall time: data loading from memory,
negative sampling, forward, backward and optimiser step, no start-up, no validation. With
``repeats=N`` each system runs N times per batch in alternating rounds
(`recsys.bench.alternating_rounds`). The speed of this shared machine drifts by 10-25% over
minutes, so each system's figure is the median of its runs and each ratio the median over
rounds of the ratio within a round (paired: runs a minute apart, not ten).

The GFLOP/s table counts the dense part's floating-point work: the MLP, GMF product and head,
forward and backward (3 x the forward's multiply-adds x 2). ``model`` counts it as the plain
NeuMF formulation does, the same for every system; ``executed`` is what the platform runs: it
computes the MLP's first layer once per distinct user and item of a batch
(`recsys.models.ops.pair_linear`), so it does less work for the same function (the ratio is
measured on the platform's own batches; on a GPU it runs the plain MLP). Both are set against
a float32 matmul of the first layer's shape on this machine, measured in the same run.

``device=cuda``: the bare loop and the platform on the GPU (the platform with
``trainer=gpu``), the matmul figure of the GPU; RecBole is not run.

``quick=true``: ml-100k, effective batches 1,280 and 4,096, one run each, no RecBole (a smoke
test). Results: ``<results>/training.json``, with ``device=cuda`` ``training_cuda.json``
(`recsys.bench`).
"""

from __future__ import annotations

import json
import operator
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from bare_neumf import BareNeuMF, train_epoch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from matmul import matmul_gflops
from omegaconf import DictConfig

from recsys import bench
from recsys.bench import Settings

HERE = Path(__file__).resolve().parent
CONF = HERE.parent / "conf"


@dataclass
class Options(Settings):
    batches: list[int] = field(default_factory=lambda: [1280, 4096, 20480])
    epochs: int = 1
    threads: int = 2
    recbole: bool = True
    device: str = "cpu"  # or cuda
    repeats: int = 3
    out: str = "logs/benchmarks/training"  # the runs' folders
    # internal: what a child process runs (bare | recsys) at which effective batch
    system: str | None = None
    batch: int | None = None


QUICK = {"batches": [1280, 4096], "repeats": 1, "recbole": False}
NEGATIVES = 4
# the held-out rows of the published figures: each user's last two (the NCF experiments hold
# out a random validation row instead)
DATA = ["experiment=ncf_protocol", "data.split.val_row=previous", f"data.num_negatives={NEGATIVES}"]
QUICK_DATA = [*DATA, "data.variant=100k"]
MODEL = [
    "model.variant=neumf",
    "model.gmf_dim=32",
    "model.mlp_dim=128",
    "model.mlp_layers=[128,64,32]",
    "model.optimizer.lr=0.001",
]
RECBOLE = "RecBole 1.2.1"
RECBOLE_PINS = ["recbole==1.2.1", "numpy<2", "pandas<2.2", "setuptools<81"]
LABELS = {"bare": "bare loop", RECBOLE: RECBOLE, "recsys": "recsys"}


def compose_run(quick: bool, overrides: list[str], batch: int | None = None) -> DictConfig:
    """The platform's config of this benchmark (``quick``: ml-100k); ``batch``: effective
    batch in samples, ``data.batch_size`` positives and their negatives."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*(QUICK_DATA if quick else DATA), *MODEL, *overrides])
    if batch is not None:
        cfg.data.batch_size = batch // (1 + cfg.data.num_negatives)
    return cfg


def training_pairs(cfg: DictConfig):
    """The platform's data module (prepared, set up) and its training positives (users, items)."""
    from recsys.train import build

    dm, _, _ = build(cfg)
    rows = dm.rows["train"]
    return dm, dm.data.interactions.users[rows], dm.data.interactions.items[rows]


# --- the systems, each run in a child process ----------------------------------------------


def bare_parts(
    cfg: DictConfig, spec, device: str = "cpu"
) -> tuple[BareNeuMF, torch.optim.Optimizer]:
    """The bare loop's NeuMF sized by ``cfg.model``, on ``device``, and its optimizer: the class
    and settings that the platform's module of the same config builds
    (`recsys.bench.reference_optimizer`)."""
    m = cfg.model
    plain = {"variant": "neumf", "dropout": 0.0, "loss": "bce", "l2": 0.0, "sparse_grad": False}
    if differ := {k: m.get(k) for k, v in plain.items() if m.get(k, v) != v}:
        raise ValueError(f"the bare loop trains plain NeuMF ({plain}); the config has {differ}")
    torch.manual_seed(0)
    model = BareNeuMF(spec.num_users, spec.num_items, m.gmf_dim, m.mlp_dim, list(m.mlp_layers))
    model.to(device)
    platform = instantiate(cfg.model, spec=spec.to_dict(), _recursive_=False)
    return model, bench.reference_optimizer(platform, model.parameters())


def run_bare(cfg: DictConfig, device: str) -> dict:
    dm, users, items = training_pairs(cfg)
    users, items = users.to(device), items.to(device)
    model, optimizer = bare_parts(cfg, dm.spec, device)
    samples, seconds = 0, 0.0
    for epoch in range(cfg.trainer.max_epochs):
        n, s, loss = train_epoch(
            model,
            optimizer,
            users,
            items,
            dm.spec.num_items,
            cfg.data.batch_size,
            cfg.data.num_negatives,
            seed=epoch,
        )
        samples, seconds = samples + n, seconds + s
    return {"samples_per_sec": samples / seconds, "train_loss": loss}


def run_recsys(cfg: DictConfig, device: str) -> dict:
    from recsys.callbacks import SamplesPerSecond
    from recsys.train import build

    dm, model, trainer = build(cfg)
    trainer.fit(model, datamodule=dm)
    speed = next(c for c in trainer.callbacks if isinstance(c, SamplesPerSecond))
    loss = float(trainer.callback_metrics["train/loss"])
    return {"samples_per_sec": speed.overall, "train_loss": loss}


def child_main(run: bench.Benchmark) -> None:
    """This process is one run of ``opts.system`` at ``opts.batch``: its figures as rows."""
    opts = run.settings
    torch.set_num_threads(opts.threads)
    out = Path(opts.out).resolve() / f"{opts.system}_{opts.batch}"
    overrides = [
        f"trainer.max_epochs={opts.epochs}",
        "+trainer.limit_val_batches=0",
        f"paths.output_dir={out}",
        "trainer=gpu" if opts.device == "cuda" else "trainer=cpu",
        *(["logger=none"] if opts.system == "bare" else []),
        *run.overrides,
    ]
    cfg = compose_run(opts.quick, overrides, opts.batch)
    figures = {"bare": run_bare, "recsys": run_recsys}[opts.system](cfg, opts.device)
    for metric, value in figures.items():
        unit = "samples/s" if metric == "samples_per_sec" else ""
        run.add(system=opts.system, model="NeuMF", metric=metric, unit=unit, value=value)
    run.write()


def child(opts: Options, system: str, batch: int, overrides: list[str]) -> dict[str, float]:
    """One run of ``system`` in a fresh Python process: its figures by metric."""
    keys = ("quick", "epochs", "threads", "device", "out")
    args = [bench.override(k, getattr(opts, k)) for k in keys]
    args += [bench.override("system", system), bench.override("batch", batch), *overrides]
    doc = bench.run_child(__file__, args)
    return {row["metric"]: row["value"] for row in doc["rows"]}


def recbole_python(cache_dir: Path) -> Path:
    """RecBole's interpreter, its virtual environment made first when missing."""
    venv = (cache_dir / "recbole-1.2.1").resolve()
    python = venv / "bin" / "python"
    if not (venv / "ready").exists():
        print(f"making RecBole's virtual environment in {venv} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pins = [f"torch=={torch.__version__.split('+')[0]}", *RECBOLE_PINS]
        subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True)
        (venv / "ready").touch()
    return python


def run_recbole(python: Path, pairs: Path, batch: int, opts: Options) -> dict[str, float]:
    """RecBole in its own environment; its figures are the JSON of its last line of output."""
    work = Path(opts.out).resolve() / f"recbole_{batch}"
    work.mkdir(parents=True, exist_ok=True)
    args = [str(HERE / "recbole_neumf.py"), str(pairs), str(work)]
    command = [str(python), *args, str(batch), str(opts.epochs), str(opts.threads)]
    # in its folder: RecBole writes log/ and log_tensorboard/ there
    done = subprocess.run(command, capture_output=True, text=True, cwd=work)
    if done.returncode != 0:
        raise RuntimeError(f"RecBole at batch {batch} failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {"samples_per_sec": figures["samples_per_sec"], "train_loss": figures["loss"]}


# --- the figures ----------------------------------------------------------------------------


def dense_macs(model: DictConfig) -> tuple[float, float]:
    """Multiply-adds per sample of NeuMF's dense forward: (all of it, the first MLP layer)."""
    layers = list(model.mlp_layers)
    first = 2 * model.mlp_dim * layers[0]
    rest = sum(a * b for a, b in zip(layers, layers[1:], strict=False))
    rest += model.gmf_dim + model.gmf_dim + layers[-1]  # GMF product, head
    return first + rest, first


def executed_share(dm, cfg: DictConfig, batches: int = 20) -> float:
    """Executed over model dense FLOPs on the platform's batches: the first layer runs on
    the distinct users and items of a batch (half a row each), the rest on every sample."""
    from recsys.data.loader import BatchIndexSampler

    total, first = dense_macs(cfg.model)
    loader = dm.train_dataloader()
    sampler = BatchIndexSampler(dm.rows["train"], cfg.data.batch_size, shuffle=True)
    shares = []
    for index, _ in zip(sampler, range(batches), strict=False):
        b = loader.dataset[index]
        users, items = b.ids("user_id"), b.ids("item_id")
        half_rows = (len(users.unique()) + len(items.unique())) / 2
        shares.append((total - first + first * half_rows / len(users)) / total)
    return float(np.mean(shares))


def main(run: bench.Benchmark) -> None:
    opts = run.settings
    if opts.device != "cpu":
        run.name = f"training_{opts.device}"  # beside the CPU table
    torch.set_num_threads(opts.threads)
    out = Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = compose_run(opts.quick, ["logger=none", f"paths.output_dir={out}/data", *run.overrides])
    dm, users, items = training_pairs(cfg)
    pairs = out / "pairs.npz"
    np.savez(pairs, users=users.numpy(), items=items.numpy(), num_items=dm.spec.num_items)
    systems = ["bare", "recsys"]
    if opts.recbole and opts.device == "cpu":
        python = recbole_python(Path(cfg.paths.cache_dir))
        systems.append(RECBOLE)
    samples = len(users) * (1 + cfg.data.num_negatives)
    data = f"{dm.source}: {len(users):,} training positives, {dm.spec.num_users:,} users, "
    data += f"{dm.spec.num_items:,} items; one epoch = {samples:,} samples"
    print(data, flush=True)

    flops = 3 * 2 * dense_macs(cfg.model)[0]  # forward, and backward at twice the forward
    for batch in opts.batches:
        where = {"batch": batch, "threads": opts.threads, "device": opts.device}
        where |= {"epochs": opts.epochs, "data": dm.source}

        def measure(system: str, batch: int = batch) -> dict[str, float]:
            if system == RECBOLE:
                figures = run_recbole(python, pairs, batch, opts)
            else:
                figures = child(opts, system, batch, run.overrides)
            print(f"{batch:,} {system}: {figures['samples_per_sec']:,.0f}/s", flush=True)
            return figures

        runs = bench.alternating_rounds(systems, opts.repeats, measure)
        rates = {s: [r["samples_per_sec"] for r in runs[s]] for s in systems}
        for system in systems:
            for metric, unit in (("samples_per_sec", "samples/s"), ("train_loss", "")):
                values = [r[metric] for r in runs[system]]
                run.add(
                    system=system,
                    model="NeuMF",
                    metric=metric,
                    unit=unit,
                    value=bench.median(values),
                    settings=where,
                    statistic="median",
                    runs=values,
                )
        for baseline in [s for s in systems if s != "recsys"]:
            run.add_paired(
                rates["recsys"],
                rates[baseline],
                operator.truediv,
                system="recsys",
                model="NeuMF",
                metric="samples_per_sec_ratio",
                unit="x",
                settings={**where, "baseline": baseline},
            )
        # the first MLP layer's product, [batch, 2M] x [2M, H1]
        m = cfg.model
        peak = matmul_gflops(batch, 2 * m.mlp_dim, m.mlp_layers[0], opts.device)
        run.add(
            system="matmul",
            model=f"float32 [{batch}, {2 * m.mlp_dim}] x [{2 * m.mlp_dim}, {m.mlp_layers[0]}]",
            metric="gflops",
            unit="GFLOP/s",
            value=peak,
            settings=where,
        )
        cfg.data.batch_size = batch // (1 + cfg.data.num_negatives)
        # on a GPU the platform runs the plain MLP (`MLPTower`)
        share = executed_share(dm, cfg) if opts.device == "cpu" else 1.0
        for system in systems:
            model_gflops = bench.median(rates[system]) * flops / 1e9
            for metric, value in (
                ("dense_gflops_model", model_gflops),
                ("dense_gflops_executed", model_gflops * (share if system == "recsys" else 1)),
            ):
                run.add(
                    system=system,
                    model="NeuMF",
                    metric=metric,
                    unit="GFLOP/s",
                    value=value,
                    settings=where,
                )
    print_tables(run.rows, opts, flops)
    run.write()


def print_tables(rows: list[dict], opts: Options, flops: float) -> None:
    """The tables it prints, from the results' rows."""

    def value(system: str, metric: str, batch: int, **where) -> float | None:
        row = bench.find(rows, system=system, metric=metric, batch=batch, **where)
        return None if row is None else row["value"]

    where = torch.cuda.get_device_name() if opts.device == "cuda" else f"{opts.threads} threads"
    median = ""
    if opts.repeats > 1:
        median = f", median of {opts.repeats} runs; ratios: median of the rounds' ratios"
    print(f"\nNeuMF, {where}, samples/s{median} (train loss after the epoch)\n")
    print(
        "| effective batch | bare loop | RecBole 1.2.1 | recsys | recsys / bare "
        "| recsys / RecBole |\n| --- | --- | --- | --- | --- | --- |"
    )
    for batch in opts.batches:
        cells = []
        for system in ("bare", RECBOLE, "recsys"):
            rate = value(system, "samples_per_sec", batch)
            loss = value(system, "train_loss", batch)
            cells.append("-" if rate is None else f"{rate:,.0f} ({loss:.3f})")
        for baseline in ("bare", RECBOLE):
            ratio = value("recsys", "samples_per_sec_ratio", batch, baseline=baseline)
            cells.append("-" if ratio is None else f"{ratio:.2f}x")
        print(f"| {batch:,} | {' | '.join(cells)} |")

    print(f"\nDense part: {flops / 1e3:.0f} KFLOP per sample (model count)\n")
    print(
        "| effective batch | matmul GFLOP/s | system | model GFLOP/s | executed GFLOP/s "
        "| of matmul |\n| --- | --- | --- | --- | --- | --- |"
    )
    for batch in opts.batches:
        peak = value("matmul", "gflops", batch)
        for system in ("bare", RECBOLE, "recsys"):
            model = value(system, "dense_gflops_model", batch)
            if model is None:
                continue
            executed = value(system, "dense_gflops_executed", batch)
            print(
                f"| {batch:,} | {peak:.1f} | {LABELS[system]} | {model:.1f} | {executed:.1f} | "
                f"{executed / peak:.0%} |"
            )


if __name__ == "__main__":
    benchmark = bench.start("training", Options, __doc__, quick=QUICK)
    if benchmark.settings.system is None:
        main(benchmark)
    else:
        child_main(benchmark)
