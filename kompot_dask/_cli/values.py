"""Readers of option values: the same function reads a flag's text and a config file's value
(YAML gives ints, floats, bools and lists already; strings are parsed). Errors are
``argparse.ArgumentTypeError``, which argparse reports with the option's name."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["text", "integer", "positive_integer", "floating", "null_genes", "gene_list", "memory_size", "flag"]


def text(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise argparse.ArgumentTypeError(f"expected a string; got {value!r}")
    out = str(value)
    if not out:
        raise argparse.ArgumentTypeError("expected a non-empty string")
    return out


def integer(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"expected an integer; got {value!r}")


def positive_integer(value: Any) -> int:
    number = integer(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {value!r}")
    return number


def floating(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"expected a number; got {value!r}")


def null_genes(value: Any) -> str | int:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        number = integer(value)
    except argparse.ArgumentTypeError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a non-negative integer; got {value!r}")
    return number


def gene_list(value: Any) -> list[str]:
    if isinstance(value, str):
        names = [name.strip() for name in value.split(",")]
    elif isinstance(value, (list, tuple)):
        names = [text(name) for name in value]
    else:
        raise argparse.ArgumentTypeError(f"expected comma-separated gene names or a list; got {value!r}")
    names = [name for name in names if name]
    if not names:
        raise argparse.ArgumentTypeError("expected at least one gene name")
    return names


def memory_size(value: Any) -> str | int:
    from dask.utils import parse_bytes

    try:
        if parse_bytes(value) <= 0:
            raise ValueError
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"expected a memory size such as '4GB'; got {value!r}") from None
    return value


def flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected true or false; got {value!r}")
    return value
