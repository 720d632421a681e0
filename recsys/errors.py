"""Mistakes in what a command was asked to do, and how the command lines report them."""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A mistake in a command's input (a missing file, an unknown id, a setting that cannot
    work) whose message names it and says what to do. The command lines print the message
    alone and exit with status 2 (`exit_on_user_error`); code that calls the package gets the
    exception."""


class InputError(UserError, ValueError):
    """A setting, id or file content that cannot be used."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder that the command needs and that is not there."""


def exit_on_user_error(task: Callable[..., T]) -> Callable[..., T]:
    """Wrap a command's task function (under ``@hydra.main``): a `UserError`, raised by the
    task or the cause of what it raised (Hydra's ``instantiate`` wraps the errors of the
    objects it builds), prints ``error: <message>`` on stderr and exits with status 2, as
    argparse does for bad arguments, instead of Hydra's traceback and status 1. Every other
    exception goes on to Hydra."""

    @functools.wraps(task)
    def wrapped(*args, **kwargs) -> T:
        try:
            return task(*args, **kwargs)
        except Exception as e:
            cause: BaseException | None = e
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__
            if cause is None:
                raise
            print(f"error: {cause}", file=sys.stderr)
            sys.exit(2)

    return wrapped


def require_extra(extra: str, *modules: str) -> None:
    """Raise `MissingInputError` naming the extra to install when one of ``modules`` is not
    installed (serving and the dashboard are extras of the package)."""
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(module)
    if missing:
        raise MissingInputError(
            f"{', '.join(missing)} not installed: this command needs the [{extra}] extra; "
            f"pip install -e '.[{extra}]' in a checkout, or pip install 'recsys[{extra}]'"
        )
