"""The ``kompot-dask`` command: ``da``, ``de``, ``run`` and ``plan`` on an AnnData file, and ``demo``.

Argument parsing only; the analyses are :func:`kompot_dask.da` and :func:`kompot_dask.de`.
See ``kompot-dask --help`` and ``kompot-dask COMMAND --help``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import traceback
import warnings
from typing import Iterator, Sequence

from ._cli import UsageError

__all__ = ["main"]

PROG = "kompot-dask"
# Errors of the invocation or the input (exit 2): the library checks names, values and
# conditions up front and raises these with a readable message.
USAGE_ERRORS = (UsageError, ValueError, TypeError, KeyError, NotImplementedError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kompot-dask`` command line.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``), e.g.
        ``["da", "atlas.h5ad", "--groupby", "condition", "--condition1", "A",
        "--condition2", "B", "-o", "out.h5ad"]``.

    Returns
    -------
    int
        Exit code: 0 done (also ``--help``, ``--version`` and a plan that fits); 1 the run
        failed, or a plan does not fit in memory; 2 a wrong invocation or unusable input
        (unknown flag, bad config, missing column or condition, unreadable input, existing
        output without ``--overwrite``). Errors are one line on stderr,
        ``kompot-dask: error: <message>``; with ``-v`` the traceback comes first.

    Notes
    -----
    stdout carries only JSON: the plan (``plan``, ``--dry-run``), or a one-line summary of
    a run. Logs, warnings and progress bars go to stderr.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in args)
    stdout = sys.stdout
    try:
        from . import __version__
        from ._cli.commands import execute
        from ._cli.options import build_parser, check, merged

        parser = build_parser(__version__)
        try:
            namespace = parser.parse_args(args)
        except SystemExit as done:  # --help, --version
            return done.code if isinstance(done.code, int) else 0
        if namespace.command is None:
            raise UsageError(f"a command is required: {', '.join(('da', 'de', 'run', 'plan', 'demo'))} (see {PROG} --help)")
        if namespace.command == "demo":
            from ._cli.demo import run as run_demo

            verbose = getattr(namespace, "verbose", False)
            with _logging(verbose), contextlib.redirect_stdout(sys.stderr):
                code, payload = run_demo(namespace)
            print(json.dumps(payload, indent=2, default=str), file=stdout, flush=True)
            return code
        values = merged(namespace)
        values["input"] = namespace.input
        verbose = values["verbose"]
        with _logging(verbose), contextlib.redirect_stdout(sys.stderr):  # stray prints stay off stdout
            check(namespace.command, values)
            code, payload = execute(namespace.command, values)
        indent = 2 if namespace.command == "plan" or values["dry_run"] else None
        print(json.dumps(payload, indent=indent, default=str), file=stdout, flush=True)
        return code
    except KeyboardInterrupt:
        return _fail("interrupted", 130, verbose)
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), stdout.fileno())
        return 1
    except Exception as err:  # noqa: BLE001 - every failure becomes one line and an exit code
        message = _in_flags(" ".join(str(err).split()) or type(err).__name__)
        return _fail(message, 2 if isinstance(err, USAGE_ERRORS) else 1, verbose)


def _flags() -> set[str]:
    """Every option string of every subcommand."""
    from . import __version__
    from ._cli.options import build_parser

    parser = build_parser(__version__)
    flags = set(parser._option_string_actions)
    for action in parser._actions:
        for sub in (getattr(action, "choices", None) or {}).values():
            flags |= set(getattr(sub, "_option_string_actions", {}))
    return flags


def _in_flags(message: str) -> str:
    """The library names keywords (```groupby=```, ```overwrite=True```); say the flags instead."""
    if not re.search(r"`[A-Za-z_][A-Za-z0-9_]*=", message):
        return message
    try:
        flags = _flags()
    except Exception:  # noqa: BLE001 - never let the rewording hide the error
        return message

    def flag(match: re.Match) -> str:
        name, value = "--" + match.group(1).replace("_", "-"), match.group(2)
        if name not in flags:
            return match.group(0)
        return name if value in ("", "True") else f"{name} {value}"

    return re.sub(r"`([A-Za-z_][A-Za-z0-9_]*)=([^`]*)`", flag, message)


def _fail(message: str, code: int, verbose: bool) -> int:
    if verbose:
        traceback.print_exc(file=sys.stderr)
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return code


@contextlib.contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    """Logs on stderr: warnings and errors, and with ``-v`` also INFO (kompot_dask's and the
    dask cluster's); Python warnings in one line each. Undone afterwards."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
    root, package = logging.getLogger(), logging.getLogger("kompot_dask")
    before = (root.level, package.level, warnings.showwarning)

    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        where = f" ({filename}:{lineno})" if verbose else ""
        print(f"{PROG}: warning: {category.__name__}: {text}{where}", file=sys.stderr)

    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    package.setLevel(logging.INFO if verbose else logging.WARNING)
    warnings.showwarning = show
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(before[0])
        package.setLevel(before[1])
        warnings.showwarning = before[2]


if __name__ == "__main__":
    sys.exit(main())
