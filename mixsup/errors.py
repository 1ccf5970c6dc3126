"""Exit codes and the one-line error convention shared by every mixsup command.

DESIGN.md: 0 success, 2 bad usage or bad input, 3 server unreachable / not ready, 1 anything else. Errors are
one readable line on stderr; the traceback only with ``--debug``.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable, Sequence

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3


class MixsupError(Exception):
    """An error with a message meant for the user and the exit code it maps to."""

    exit_code = EXIT_FAILURE


class InputError(MixsupError):
    """The user's input (a file, a flag value, a checkpoint) cannot be used."""

    exit_code = EXIT_BAD_INPUT


class ServerUnavailable(MixsupError):
    """The inference server cannot be reached or is not ready."""

    exit_code = EXIT_UNAVAILABLE


def run_command(
    prog: str,
    parser: argparse.ArgumentParser,
    handler: Callable[[argparse.Namespace], int | None],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv``, run ``handler`` and turn exceptions into one stderr line plus an exit code.

    ``parser`` must define ``--debug``; argparse itself exits 2 on bad usage, which is the contract's code.
    """
    args = parser.parse_args(argv)
    try:
        return int(handler(args) or EXIT_OK)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except MixsupError as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the last line of defence of a CLI
        if getattr(args, "debug", False):
            traceback.print_exc()
        first_line = (str(exc).strip().splitlines() or [""])[0]
        print(f"{prog}: error: {type(exc).__name__}: {first_line}", file=sys.stderr)
        return EXIT_FAILURE


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="print the full traceback on errors")
