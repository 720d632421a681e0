"""The command lines as a user meets them: --help, and mistakes in what they are asked to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import InstantiationException

from recsys.errors import InputError, MissingInputError, exit_on_user_error

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train.py", "evaluate.py", "predict.py")


def command(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_the_config_groups_a_user_picks():
    out = command("train.py", "--help")
    assert out.returncode == 0, out.stderr
    assert "data: books, criteo, csv, movielens, synthetic" in out.stdout
    assert "logger: csv, mlflow, none, wandb" in out.stdout
    assert "model: dlrm, ease, hybrid, itemknn, logreg, mf, ncf" in out.stdout
    assert "_common" not in out.stdout and "data_common" not in out.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_entry_points_load_no_torch_before_hydra_parses(script):
    """--help answers without importing Lightning or torch (they took about 11 s)."""
    code = (
        "import runpy, sys; "
        f"runpy.run_path({script!r}, run_name='entry'); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning'}))"
    )
    out = command("-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_user_error_exits_2_with_the_message_alone(capsys):
    @exit_on_user_error
    def task(error: Exception) -> None:
        raise error

    for error in (
        InputError("unknown user ids ['424242']"),
        MissingInputError("ml-100k: raw files not found"),
        # what Hydra's instantiate raises for an error in the object it builds
        _wrapped(InputError("data.variant='7m' is not one of [...]")),
    ):
        with pytest.raises(SystemExit) as exit_:
            task(error)
        assert exit_.value.code == 2
        message = str(error.__cause__ or error)
        assert capsys.readouterr().err == f"error: {message}\n"
    with pytest.raises(KeyError):  # a bug is no user error: Hydra reports it with its traceback
        task(KeyError("x"))


def _wrapped(cause: Exception) -> InstantiationException:
    try:
        raise InstantiationException("Error in call to target 'recsys.data...'") from cause
    except InstantiationException as e:
        return e


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_dir, cache_dir) -> Path:
    """The last checkpoint of a few training batches on ml-100k."""
    from recsys.train import run
    from tests.conftest import compose_train

    out = tmp_path_factory.mktemp("train")
    run(compose_train(data_dir, cache_dir, out, "debug=limit", "trainer.max_epochs=1"))
    return out / "checkpoints" / "last.ckpt"


PATHS = ["paths.data_dir={data}", "paths.cache_dir={cache}"]
NO_METRICS = "run_dir={tmp}/empty_run holds no metrics.json"
# the command line, and the message it ends with ({tmp}: the test's folder)
USER_ERRORS = {
    "train-missing-dataset": (
        ["train.py", "paths.data_dir={tmp}", "data.download=false"],
        "ml-100k: raw files not found in {tmp}/ml-100k",
    ),
    "evaluate-missing-checkpoint": (
        ["evaluate.py", "ckpt_path={tmp}/nope.ckpt", *PATHS],
        "ckpt_path={tmp}/nope.ckpt does not exist",
    ),
    "predict-unknown-user": (
        ["predict.py", "ckpt_path={ckpt}", "user_ids=[1,424242]", *PATHS],
        "unknown user ids ['424242'] (not in ml-100k)",
    ),
    "serve-run-dir-without-metrics": (
        ["-m", "recsys.serve", "run_dir={tmp}/empty_run", *PATHS],
        NO_METRICS,
    ),
    "serve-file-that-is-not-a-checkpoint": (
        ["-m", "recsys.serve", "ckpt_path={tmp}/empty_run/notes.txt", *PATHS],
        "{tmp}/empty_run/notes.txt is not a checkpoint that torch.load reads",
    ),
    "dashboard-run-dir-without-metrics": (
        ["-m", "recsys.dashboard", "run_dir={tmp}/empty_run", *PATHS],
        NO_METRICS,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_errors_print_the_message_alone_and_exit_2(
    case, request, data_dir, cache_dir, tmp_path
):
    """Hydra printed a traceback before the message and exited 1."""
    args, message = USER_ERRORS[case]
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "notes.txt").write_text("not a checkpoint")
    ckpt = request.getfixturevalue("checkpoint") if case.startswith("predict") else None
    values = {"tmp": tmp_path, "data": data_dir, "cache": cache_dir, "ckpt": ckpt}
    out = command(*(a.format(**values) for a in args), f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"error: {message.format(**values)}" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
