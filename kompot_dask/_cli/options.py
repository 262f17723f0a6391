"""The command line's options, declared once: the parser, configuration files and the keywords
passed to :func:`kompot_dask.da` / :func:`kompot_dask.de` all come from :data:`OPTIONS`.

Precedence: a flag given on the command line, else the value in ``--config``, else the
option's default (``None`` for most: the library's own default applies).
"""

from __future__ import annotations

import argparse
import json
import pathlib
from dataclasses import dataclass
from typing import Any, Callable

from . import UsageError
from .values import flag, floating, gene_list, integer, memory_size, null_genes, positive_integer, text

COMMANDS = {  # command -> (analyses it runs or plans, help)
    "da": (("da",), "differential abundance (kompot_dask.da) into obs"),
    "de": (("de",), "differential expression (kompot_dask.de) into var / layers"),
    "run": (("da", "de"), "differential abundance, then differential expression, on the same atlas"),
    "plan": (("da", "de"), "print the memory plan of both analyses as JSON (computes and writes nothing)"),
}
ANALYSES = ("da", "de")
CLI_ONLY = ()  # `stages` of options used by the command line itself, not passed to da()/de()


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Option:
    """One option: its flags, how a value is read, and which analyses receive it.

    ``parse=None`` makes a switch (``store_true``; with ``negatable`` also ``--no-<flag>``,
    and unset passes nothing, so the library decides). ``stages`` lists the analyses whose
    function gets it as keyword ``kwarg`` (default: the option's name); an empty
    ``stages`` marks an option of the command line itself. ``commands`` limits the
    subcommands that show it (default: those running one of ``stages``, or all).
    """

    dest: str
    flags: tuple[str, ...]
    help: str
    parse: Callable[[Any], Any] | None = None
    stages: tuple[str, ...] = ANALYSES
    kwarg: str | None = None
    commands: tuple[str, ...] | None = None
    metavar: str | None = None
    group: str = "analysis"
    default: Any = None
    negatable: bool = False

    @property
    def switch(self) -> bool:
        return self.parse is None

    def shown_on(self, command: str) -> bool:
        if self.commands is not None:
            return command in self.commands
        return not self.stages or bool(set(self.stages) & set(COMMANDS[command][0]))

    def keyword(self) -> str:
        return self.kwarg or self.dest


_ANALYSE = ("da", "de", "run")  # commands that compute (and write)
_NAMES = ("--groupby", "--condition1", "--condition2")

OPTIONS: tuple[Option, ...] = (
    # what to compare
    Option("groupby", ("--groupby",), "obs column with each cell's condition (required)", text, metavar="COLUMN",
           group="comparison"),
    Option("condition1", ("--condition1",), "reference condition (required)", text, metavar="VALUE",
           group="comparison"),
    Option("condition2", ("--condition2",), "condition compared with condition1 (required)", text,
           metavar="VALUE", group="comparison"),
    Option("obsm_key", ("--obsm-key",), "obsm entry with the cell states (default: DM_EigenVectors)", text,
           metavar="KEY", group="comparison", default="DM_EigenVectors"),
    Option("sample_col", ("--sample-col",), "obs column with each cell's sample: adds the between-replicate "
           "variance", text, metavar="COLUMN", group="comparison"),
    Option("layer", ("--layer",), "DE: expression layer (default: X)", text, stages=("de",), metavar="LAYER",
           group="comparison"),
    Option("genes", ("--genes",), "DE: comma-separated genes to analyse (default: all)", gene_list, stages=("de",),
           metavar="G1,G2,..", group="comparison"),
    # model
    Option("result_key", ("--result-key",), "prefix of the result fields (default: kompot_da / kompot_de)", text,
           metavar="KEY"),
    Option("n_landmarks", ("--n-landmarks",), "landmarks of the Gaussian processes", integer, metavar="N"),
    Option("random_state", ("--random-state",), "seed of the landmark k-means", integer, metavar="SEED"),
    Option("batch_size", ("--batch-size",), "cells per prediction batch", integer, metavar="N"),
    Option("ls_factor", ("--ls-factor",), "multiplier of the estimated length scale", floating, metavar="X"),
    Option("lfc_threshold", ("--lfc-threshold",), "DA: |log fold change| for a direction call", floating,
           stages=("da",), metavar="X"),
    Option("ptp_threshold", ("--ptp-threshold",), "DA: posterior tail probability for a direction call", floating,
           stages=("da",), metavar="P"),
    Option("spatial_fdr", ("--spatial-fdr",), "DA: also call cells at this FDR controlled over the state map "
           "(obs ..._spatial_fdr / ..._spatial_direction; off by default)", floating, stages=("da",),
           metavar="ALPHA"),
    Option("null_genes", ("--null-genes",), "DE: null genes of the FDR ('auto' or a count)", null_genes,
           stages=("de",), metavar="auto|N"),
    Option("null_seed", ("--null-seed",), "DE: seed of the null genes", integer, stages=("de",), metavar="SEED"),
    Option("fdr_threshold", ("--fdr-threshold",), "DE: local FDR below which a gene is called DE", floating,
           stages=("de",), kwarg="threshold", metavar="P"),
    Option("use_empirical_variance", ("--use-empirical-variance",), "DE: add the empirical residual variance",
           stages=("de",)),
    Option("store_additional_stats", ("--store-additional-stats",), "DE: also store p-values, tail FDR, "
           "-log10 PTP and z-scores", stages=("de",)),
    Option("replicate_null", ("--replicate-null",), "DE: call genes against the sample-relabelling null as "
           "well (on by default with --sample-col and at least 3 samples; --replicate-null requires it, "
           "--no-replicate-null switches it off)", stages=("de",), negatable=True),
    Option("store_landmarks", ("--store-landmarks",), "store the landmarks in uns (reused by later runs)"),
    Option("overwrite", ("--overwrite",), "replace Kompot fields of an earlier run, and an existing output "
           "file", stages=CLI_ONLY, commands=_ANALYSE, group="output"),  # always passed to da()/de()
    # files
    Option("output", ("-o", "--output"), "where the AnnData with the results goes (.h5ad or .zarr; required "
           "unless --dry-run)", text, stages=CLI_ONLY, commands=_ANALYSE, metavar="PATH", group="output"),
    Option("table_output", ("-t", "--table-output"), "also write the per-cell DA / per-gene DE table (.csv or "
           ".tsv; `run` writes <stem>_da<ext> and <stem>_de<ext>)", text, stages=CLI_ONLY, commands=_ANALYSE,
           metavar="PATH", group="output"),
    Option("dry_run", ("--dry-run",), "print the memory plan as JSON and exit; nothing is computed or written",
           stages=CLI_ONLY, commands=_ANALYSE, group="output"),
    # where it runs
    Option("scheduler", ("--scheduler",), "address of a running dask scheduler (tcp://host:8786)", text,
           stages=CLI_ONLY, metavar="ADDRESS", group="cluster"),
    Option("scheduler_file", ("--scheduler-file",), "scheduler file of a running dask cluster", text,
           stages=CLI_ONLY, metavar="PATH", group="cluster"),
    Option("n_workers", ("--n-workers",), "start a local cluster of N worker processes", positive_integer,
           stages=CLI_ONLY, metavar="N", group="cluster"),
    Option("memory_limit", ("--memory-limit",), "memory limit per worker of the local cluster (e.g. 4GB)",
           memory_size, stages=CLI_ONLY, metavar="SIZE", group="cluster"),
    Option("no_progress", ("--no-progress",), "no progress bars (on stderr)", stages=CLI_ONLY, group="cluster"),
)
BY_DEST = {option.dest: option for option in OPTIONS}
CONFIG_KEYS = tuple(sorted(BY_DEST))
GROUP_TITLES = {"comparison": "what to compare", "analysis": "analysis settings", "output": "output",
                "cluster": "where it runs"}


# --------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised (reported in one line by ``main``)."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser(version: str) -> argparse.ArgumentParser:
    """The ``kompot-dask`` parser. Options default to ``SUPPRESS``: the namespace holds only
    what was given, so configuration values can fill in the rest."""
    parser = _Parser(
        prog="kompot-dask",
        description="Differential abundance and expression between two conditions of a single-cell atlas "
                    "(Kompot's method on dask). Results go into a copy of the AnnData; stdout carries only "
                    "JSON (the plan, or a one-line summary), logs and progress go to stderr.",
        epilog="exit codes: 0 done; 1 the run failed (or, for a plan, does not fit in memory); "
               "2 wrong invocation or unusable input.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    _add_common(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (_, summary) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=summary)
        sub.add_argument("input", metavar="INPUT", help="the atlas: an .h5ad file or an AnnData-zarr directory")
        sub.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                         help="YAML or JSON mapping of option names (with underscores) to values; flags override it")
        groups = {key: sub.add_argument_group(title) for key, title in GROUP_TITLES.items()}
        for option in OPTIONS:
            if not option.shown_on(name):
                continue
            extra: dict[str, Any] = {"type": _for_argparse(option), "metavar": option.metavar}
            if option.switch:
                extra = {"action": argparse.BooleanOptionalAction if option.negatable else "store_true"}
            groups[option.group].add_argument(*option.flags, dest=option.dest, help=option.help,
                                              default=argparse.SUPPRESS, **extra)
        _add_common(sub)
    from .demo import add_parser as add_demo

    add_demo(commands)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log at INFO on stderr, and print tracebacks of errors")


def _for_argparse(option: Option) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return option.parse(text)

    parse.__name__ = option.dest  # argparse names the option in its messages
    return parse


# --------------------------------------------------------------------------- config
def read_config(path: str) -> dict[str, Any]:
    """A configuration file as ``{option: value}``: YAML (``yaml.safe_load``) or JSON, keys
    checked against :data:`CONFIG_KEYS` and values read by each option's parser."""
    file = pathlib.Path(path)
    try:
        text = file.read_text()
    except OSError as err:
        raise UsageError(f"cannot read config file {path}: {err.strerror or err}") from err
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(text) if text.strip() else {}
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - any parser error is a bad config
        detail = " ".join(str(err).split())
        raise UsageError(f"config file {path} is not valid {'JSON' if file.suffix.lower() == '.json' else 'YAML'}: "
                         f"{detail}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of option names to values; got "
                         f"{type(data).__name__}")
    values: dict[str, Any] = {}
    unknown = []
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        option = BY_DEST.get(key)
        if option is None:
            unknown.append(str(raw_key))
            continue
        if value is None:
            continue  # `key:` with no value leaves the default
        try:
            values[key] = flag(value) if option.switch else option.parse(value)
        except argparse.ArgumentTypeError as err:
            raise UsageError(f"config file {path}: {key}: {err}") from err
    if unknown:
        raise UsageError(f"config file {path}: unknown option(s) {', '.join(sorted(unknown))}; valid options are "
                         f"{', '.join(CONFIG_KEYS)}")
    return values


def merged(namespace: argparse.Namespace) -> dict[str, Any]:
    """Every option's value: defaults, overridden by the config file, overridden by flags."""
    given = vars(namespace)
    values = {option.dest: (False if option.switch and not option.negatable else option.default)
              for option in OPTIONS}
    if "config" in given:
        values.update(read_config(given["config"]))
    values.update({k: v for k, v in given.items() if k in BY_DEST})
    values["verbose"] = bool(given.get("verbose", False))
    return values


def check(command: str, values: dict[str, Any]) -> None:
    """What the parser cannot check alone: required values (flag or config) and exclusions."""
    missing = [flag for flag in _NAMES if values[flag[2:]] is None]
    if missing:
        raise UsageError(f"the following arguments are required (as flags or in --config): {', '.join(missing)}")
    if values["condition1"] == values["condition2"]:
        raise UsageError(f"--condition1 and --condition2 are the same ({values['condition1']!r})")
    if values["scheduler"] is not None and values["scheduler_file"] is not None:
        raise UsageError("give --scheduler or --scheduler-file, not both")
    if (values["scheduler"] or values["scheduler_file"]) and (values["n_workers"] or values["memory_limit"]):
        raise UsageError("--n-workers / --memory-limit start a local cluster; they cannot be combined with "
                         "--scheduler / --scheduler-file")
    if command != "plan" and not values["dry_run"] and values["output"] is None:
        raise UsageError("the following arguments are required: -o/--output (or --dry-run to only plan)")


def analysis_kwargs(values: dict[str, Any], stage: str) -> dict[str, Any]:
    """Keywords of ``da()`` (``stage="da"``) or ``de()``: every option of that analysis that
    was set (unset ones keep the library's defaults)."""
    kwargs: dict[str, Any] = {}
    for option in OPTIONS:
        if stage not in option.stages:
            continue
        value = values[option.dest]
        if value is None or (option.switch and not option.negatable and not value):
            continue
        kwargs[option.keyword()] = value
    return kwargs
