"""``kompot-dask demo``: the main job on a generated atlas with known truth (:func:`kompot_dask.demo.run_demo`)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]

SUMMARY = ("generate a two-condition atlas with known truth (3 + 3 replicates), run da + de with sample "
           "variance on a local cluster, write figures and report how well the truth was recovered")


def add_parser(commands: Any) -> None:
    """Add the ``demo`` subcommand to ``commands`` (argparse subparsers)."""
    sub = commands.add_parser("demo", help=SUMMARY, description=SUMMARY)
    sub.add_argument("-o", "--output", default="kompot_demo", metavar="DIR",
                     help="folder for the atlas (AnnData-zarr with results), figures and summary.json "
                          "(default: kompot_demo; must not exist unless --overwrite)")
    sub.add_argument("--cells", type=int, default=6000, help="cells (default 6000)")
    sub.add_argument("--genes", type=int, default=300, help="genes (default 300)")
    sub.add_argument("--n-landmarks", type=int, default=300, help="shared landmarks (default 300)")
    sub.add_argument("--n-workers", type=int, default=2, help="worker processes of the local cluster (default 2)")
    sub.add_argument("--memory-limit", default="4GB", help="memory limit per worker (default 4GB)")
    sub.add_argument("--no-cluster", action="store_true", help="run in this process, without a cluster")
    sub.add_argument("--no-figures", action="store_true", help="do not write the PNG figures")
    sub.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_argument("--overwrite", action="store_true", help="replace an earlier demo folder")
    sub.add_argument("--seed", type=int, default=0, help="seed of the atlas (default 0)")
    sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                     help="log at INFO on stderr, and print tracebacks of errors")


def run(ns: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    """Run the demo; returns the exit code and its summary (JSON for stdout)."""
    from ..demo import run_demo

    summary = run_demo(ns.output, n_cells=ns.cells, n_genes=ns.genes, n_landmarks=ns.n_landmarks,
                       n_workers=ns.n_workers, memory_limit=ns.memory_limit, cluster=not ns.no_cluster,
                       figures=not ns.no_figures, progress=not ns.no_progress, overwrite=ns.overwrite,
                       seed=ns.seed)
    return 0, summary
