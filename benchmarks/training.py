"""Training throughput: the platform against a bare PyTorch loop and RecBole 1.2.1, same work.

    python benchmarks/training.py [quick=true] [batches=[1280,4096,20480]] [epochs=1]
        [threads=2] [recbole=true] [device=cpu] [repeats=3] [out=logs/benchmarks/training]
        [overrides=[...]]

The work: NeuMF (GMF 32, MLP on 2 x 128 embeddings with layers 128-64-32), leave-one-out on the
shared ml-1m (``experiment=ncf_protocol`` with ``data.split.val_row=previous``: implicit
feedback, each user's last two interactions held out), 4 uniform negatives per training
positive (never one of the user's training items), Adam at lr 0.001, binary cross-entropy, one
epoch = every training positive and its negatives. ``batches`` are effective batches in samples
(positives and negatives): the platform's ``data.batch_size`` is a fifth of that.

Three systems train it, each in a fresh process with ``threads`` torch threads:

- ``bare``: `benchmarks/bare_neumf.py`, a hand-written vectorised loop (nn.Embedding, Adam
  with torch's defaults, negatives of the whole epoch drawn in one call);
- ``recsys``: the platform's own path, `recsys.train.build` and ``Trainer.fit`` with the
  default callbacks and logger, validation off; the figure is the `SamplesPerSecond` callback's;
- ``RecBole``: `benchmarks/recbole_neumf.py` in RecBole 1.2.1's own virtual environment,
  made on first use under ``<paths.cache_dir>/recbole-1.2.1`` (RecBole 1.2.1 needs numpy<2,
  pandas<2.2 and setuptools<81; torch is the version installed here), trained on the very
  training pairs of the platform.

Each figure is samples per second over the epochs' wall time: data loading from memory,
negative sampling, forward, backward and optimiser step, no start-up, no validation. With
``repeats=N`` each system runs N times per batch, in rounds: one run of each system per round,
back to back, the order reversed every other round. The speed of this shared machine drifts by
10-25% over minutes, so the table gives each system's median run and, as the ratios, the
median over rounds of the ratio within a round (paired: runs a minute apart, not ten).

The GFLOP/s table counts the dense part's floating-point work: the MLP, GMF product and head,
forward and backward (3 x the forward's multiply-adds x 2). ``model`` counts it as the plain
NeuMF formulation does, the same for every system; ``executed`` is what the platform runs: it
computes the MLP's first layer once per distinct user and item of a batch (`NeuMF._mlp_tower`),
so it does less work for the same function (the ratio is measured on the platform's own
batches; on a GPU it runs the plain MLP). Both are set against a float32 matmul of the first
layer's shape on this machine, measured in the same run.

``device=cuda``: the bare loop and the platform on the GPU (the platform with
``trainer=gpu``), the matmul figure of the GPU; RecBole is not run.

``quick=true``: ml-100k, effective batches 1,280 and 4,096, one run each, no RecBole (a smoke
test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

HERE = Path(__file__).resolve().parent
CONF = HERE.parent / "conf"
sys.path.insert(0, str(HERE))  # bare_neumf and matmul, when run as a script
from matmul import matmul_gflops  # noqa: E402

DEFAULTS = {
    "quick": False,
    "batches": [1280, 4096, 20480],
    "epochs": 1,
    "threads": 2,
    "recbole": True,
    "device": "cpu",  # or cuda
    "repeats": 3,
    "out": "logs/benchmarks/training",
    "overrides": [],  # more Hydra overrides for the platform's runs, e.g. [data.num_workers=1]
}
NEGATIVES = 4
GMF_DIM, MLP_DIM, LAYERS = 32, 128, [128, 64, 32]
# the held-out rows of the published figures: each user's last two (the NCF experiments hold
# out a random validation row instead)
DATA = ["experiment=ncf_protocol", "data.split.val_row=previous", f"data.num_negatives={NEGATIVES}"]
QUICK_DATA = [*DATA, "data.variant=100k"]
MODEL = [
    "model.variant=neumf",
    f"model.gmf_dim={GMF_DIM}",
    f"model.mlp_dim={MLP_DIM}",
    f"model.mlp_layers=[{','.join(map(str, LAYERS))}]",
    "model.optimizer.lr=0.001",
]
RECBOLE = ["recbole==1.2.1", "numpy<2", "pandas<2.2", "setuptools<81"]
CHILD = "RECSYS_TRAINING_BENCHMARK_CHILD"  # a child process's system, data and batch (JSON)


def compose_train(data: list[str], overrides: list[str]):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=[*data, *MODEL, *overrides])


def training_pairs(data: list[str], out: Path):
    """The platform's data module (prepared, set up) and its training positives (users, items)."""
    from recsys.train import build

    dm, _, _ = build(compose_train(data, ["logger=none", f"paths.output_dir={out}/data"]))
    rows = dm.rows["train"]
    return dm, dm.data.interactions.users[rows], dm.data.interactions.items[rows]


# --- the three systems, each run in a child process ----------------------------------------


def run_bare(data: list[str], batch: int, epochs: int, out: Path, device: str, overrides=()):
    from bare_neumf import BareNeuMF, train_epoch

    dm, users, items = training_pairs(data, out)
    users, items = users.to(device), items.to(device)
    torch.manual_seed(0)
    model = BareNeuMF(dm.spec.num_users, dm.spec.num_items, GMF_DIM, MLP_DIM, LAYERS).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    positives, samples, seconds = batch // (1 + NEGATIVES), 0.0, 0.0
    for epoch in range(epochs):
        n, s, loss = train_epoch(
            model, optimizer, users, items, dm.spec.num_items, positives, NEGATIVES, seed=epoch
        )
        samples, seconds = samples + n, seconds + s
    return {"samples_per_sec": samples / seconds, "loss": loss}


def run_recsys(data: list[str], batch: int, epochs: int, out: Path, device: str, overrides=()):
    from recsys.callbacks import SamplesPerSecond
    from recsys.train import build

    cfg = compose_train(
        data,
        [
            f"data.batch_size={batch // (1 + NEGATIVES)}",
            f"trainer.max_epochs={epochs}",
            "+trainer.limit_val_batches=0",
            f"paths.output_dir={out}/recsys_{batch}",
            "trainer=gpu" if device == "cuda" else "trainer=cpu",
            *overrides,
        ],
    )
    dm, model, trainer = build(cfg)
    trainer.fit(model, datamodule=dm)
    speed = next(c for c in trainer.callbacks if isinstance(c, SamplesPerSecond))
    return {"samples_per_sec": speed.overall, "loss": float(trainer.callback_metrics["train/loss"])}


def recbole_python(cache_dir: Path) -> Path:
    """RecBole's interpreter, its virtual environment made first when missing."""
    venv = (cache_dir / "recbole-1.2.1").resolve()
    python = venv / "bin" / "python"
    if not (venv / "ready").exists():
        print(f"making RecBole's virtual environment in {venv} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pins = [f"torch=={torch.__version__.split('+')[0]}", *RECBOLE]
        subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True)
        (venv / "ready").touch()
    return python


def run_recbole(python: Path, pairs: Path, batch: int, epochs: int, threads: int, out: Path):
    work = out / f"recbole_{batch}"
    work.mkdir(parents=True, exist_ok=True)
    args = [str(HERE / "recbole_neumf.py"), str(pairs), str(work)]
    command = [str(python), *args, str(batch), str(epochs), str(threads)]
    # in its folder: RecBole writes log/ and log_tensorboard/ there
    return last_json(command, f"RecBole at batch {batch}", cwd=work)


def child(system: str, data, batch: int, epochs: int, threads: int, out: Path, device, overrides):
    """Runs one system in a fresh Python process; returns its JSON figures."""
    spec = {"system": system, "data": data, "batch": batch, "epochs": epochs, "device": device}
    spec = json.dumps({**spec, "overrides": list(overrides)})
    command = [sys.executable, __file__, f"threads={threads}", f"out={out}"]
    return last_json(command, f"{system} at batch {batch}", env={**os.environ, CHILD: spec})


def last_json(command: list[str], what: str, **kwargs) -> dict:
    """Runs a command; its figures are the JSON of its last line of output."""
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the figures ----------------------------------------------------------------------------


def median_run(runs: list[dict]) -> dict:
    """The run with the median samples/s (the lower middle one of an even number)."""
    ranked = sorted(runs, key=lambda r: r["samples_per_sec"])
    return ranked[(len(ranked) - 1) // 2]


def paired_ratio(runs: dict[str, list[dict]], system: str, baseline: str) -> float | None:
    """The median over rounds of system's samples/s over baseline's in the same round."""
    if system not in runs or baseline not in runs:
        return None
    pairs = zip(runs[system], runs[baseline], strict=True)
    return float(np.median([a["samples_per_sec"] / b["samples_per_sec"] for a, b in pairs]))


def dense_macs() -> tuple[float, float]:
    """Multiply-adds per sample of the dense part's forward: (all of it, the first MLP layer)."""
    first = 2 * MLP_DIM * LAYERS[0]
    rest = sum(a * b for a, b in zip(LAYERS, LAYERS[1:], strict=False)) + GMF_DIM + GMF_DIM
    rest += LAYERS[-1]  # head
    return first + rest, first


def executed_share(dm, batch: int, batches: int = 20) -> float:
    """Executed over model dense FLOPs on the platform's batches: the first layer runs on
    the distinct users and items of a batch (half a row each), the rest on every sample."""
    from recsys.data.loader import BatchIndexSampler

    total, first = dense_macs()
    loader = dm.train_dataloader()
    sampler = BatchIndexSampler(dm.rows["train"], batch // (1 + NEGATIVES), shuffle=True)
    shares = []
    for index, _ in zip(sampler, range(batches), strict=False):
        b = loader.dataset[index]
        users, items = b.ids("user_id"), b.ids("item_id")
        half_rows = (len(users.unique()) + len(items.unique())) / 2
        shares.append((total - first + first * half_rows / len(users)) / total)
    return float(np.mean(shares))


def main(opts) -> None:
    torch.set_num_threads(opts.threads)
    data = QUICK_DATA if opts.quick else DATA
    batches = [1280, 4096] if opts.quick else list(opts.batches)
    use_recbole = bool(opts.recbole) and not opts.quick and opts.device == "cpu"
    repeats = 1 if opts.quick else opts.repeats
    out = Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    dm, users, items = training_pairs(data, out)
    pairs = out / "pairs.npz"
    np.savez(pairs, users=users.numpy(), items=items.numpy(), num_items=dm.spec.num_items)
    python = recbole_python(Path(compose_train(data, []).paths.cache_dir)) if use_recbole else None
    dataset = f"{dm.source}: {len(users):,} training positives, {dm.spec.num_users:,} users, "
    dataset += f"{dm.spec.num_items:,} items"
    print(f"{dataset}; one epoch = {len(users) * (1 + NEGATIVES):,} samples", flush=True)

    rows = []
    for batch in batches:
        run = (data, batch, opts.epochs, opts.threads, out, opts.device, opts.overrides)
        runs: dict[str, list[dict]] = {}
        systems = ["bare", "recsys", *(["recbole"] if python is not None else [])]
        for round_ in range(repeats):
            for system in systems if round_ % 2 == 0 else systems[::-1]:
                if system == "recbole":
                    result = run_recbole(python, pairs, batch, opts.epochs, opts.threads, out)
                else:
                    result = child(system, *run)
                runs.setdefault(system, []).append(result)
            rates = {k: f"{runs[k][-1]['samples_per_sec']:,.0f}/s" for k in systems}
            print(batch, rates, flush=True)
        figures = {k: median_run(v) for k, v in runs.items()}
        ratios = {k: paired_ratio(runs, "recsys", k) for k in ("bare", "recbole")}
        rows.append((batch, figures, ratios))

    def rate(figures: dict, system: str) -> str:
        return f"{figures[system]['samples_per_sec']:,.0f}" if system in figures else "-"

    where = torch.cuda.get_device_name() if opts.device == "cuda" else f"{opts.threads} threads"
    median = ""
    if repeats > 1:
        median = f", median of {repeats} runs; ratios: median of the rounds' ratios"
    print(f"\nNeuMF, {where}, samples/s{median} (train loss after the epoch)\n")
    print(
        "| effective batch | bare loop | RecBole 1.2.1 | recsys | recsys / bare "
        "| recsys / RecBole |\n| --- | --- | --- | --- | --- | --- |"
    )
    for batch, f, ratios in rows:
        systems = ("bare", "recbole", "recsys")
        cells = [f"{rate(f, s)} ({f[s]['loss']:.3f})" if s in f else "-" for s in systems]
        cells += [f"{r:.2f}x" if r is not None else "-" for r in ratios.values()]
        print(f"| {batch:,} | {' | '.join(cells)} |")

    total, _ = dense_macs()
    flops = 3 * 2 * total  # forward, and backward at twice the forward
    print(f"\nDense part: {flops / 1e3:.0f} KFLOP per sample (model count)\n")
    print(
        "| effective batch | matmul GFLOP/s | system | model GFLOP/s | executed GFLOP/s "
        "| of matmul |\n| --- | --- | --- | --- | --- | --- |"
    )
    for batch, f, _ in rows:
        # the first MLP layer's product, [batch, 2M] x [2M, H1]
        peak = matmul_gflops(batch, 2 * MLP_DIM, LAYERS[0], opts.device)
        share = executed_share(dm, batch)
        for system, fig in f.items():
            model = fig["samples_per_sec"] * flops / 1e9
            # on a GPU the platform runs the plain MLP (`NeuMF._mlp_tower`)
            executed = model * (share if system == "recsys" and opts.device == "cpu" else 1.0)
            print(
                f"| {batch:,} | {peak:.1f} | {system} | {model:.1f} | {executed:.1f} | "
                f"{executed / peak:.0%} |"
            )


if __name__ == "__main__":
    opts = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli())
    if CHILD not in os.environ:
        main(opts)
    else:
        torch.set_num_threads(opts.threads)
        spec = json.loads(os.environ[CHILD])
        run = (spec["data"], spec["batch"], spec["epochs"], Path(opts.out), spec["device"])
        runner = {"bare": run_bare, "recsys": run_recsys}[spec["system"]]
        result = runner(*run, spec["overrides"])
        print(json.dumps(result))
