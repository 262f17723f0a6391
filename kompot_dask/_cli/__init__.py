"""Pieces of the ``kompot-dask`` command line (:mod:`kompot_dask.cli` is the entry point).

- :mod:`.options`: every flag once (name, parser, which analyses use it), the argument
  parser built from that table, configuration files and their precedence;
- :mod:`.files`: the input AnnData, and outputs written aside and moved into place;
- :mod:`.plan`: the memory plan of ``plan`` / ``--dry-run``;
- :mod:`.commands`: the subcommands, calling :func:`kompot_dask.da` / :func:`kompot_dask.de`.
"""

from __future__ import annotations


class UsageError(Exception):
    """A wrong invocation or unusable input: reported in one line, exit code 2."""
