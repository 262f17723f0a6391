"""Calibration of the gene (DE) and cell (DA) calls on ground-truth atlases with replicates.

    python benchmarks/calibration.py                 # 20 null + 10 signal atlases (about 1-2 h on 2 cores)
    python benchmarks/calibration.py --quick         # 3 null + 2 signal, a smoke run
    python benchmarks/calibration.py --null 20 --signal 10 [--cells 3000] [--genes 500]
        [--landmarks 300] [--de-strength 2.0] [--regions 30] [--no-da] [--details out.json]

Atlases come from :func:`kompot_dask.testing.simulate_atlas` (3 + 3 samples, each sample
tilting abundance smoothly over the map and shifting every gene's level): *null* atlases
have no condition effect at all; *signal* atlases have known DA regions and DE genes
(5 %, each changed by ``--de-strength`` on the log-rate scale in a local region).

Gene calls at FDR 5 % (``DifferentialExpression`` at ``--landmarks`` shared landmarks,
Kompot's other defaults, distances at the landmarks):

* ``a_nullgenes``: Kompot's null-gene FDR (as many permuted null genes as genes), no
  sample column: Kompot's behaviour without replicates;
* ``b_nullgenes_sv``: the same null genes with sample variance (sample labels given);
* ``c_relabel``: sample relabelling null (every other split of the 6 samples into 3 + 3),
  pooled over genes, BH, on the sample-variance distances;
* ``d_relabel_bal``: the same after weighting each sample's cells to the pooled cell
  distribution over ``--regions`` regions (abundance changes no longer move the means);
* ``e_relabel_bal_gpd``: ``d`` with a generalised-Pareto tail for p-values beyond the
  null's top 10 %.

Cell calls (``DifferentialAbundance`` at the same landmarks): Kompot's direction
(|lfc| > 1 and PTP < 0.05) without and with sample variance, and the spatial-FDR call
(weighted BH over the landmarks at 5 %) without and with sample variance.

Reported per method: on null atlases the fraction with any call (and the mean number); on
signal atlases the mean false-discovery proportion and the mean power, and the power of the
*oracle cut* of the method's own ranking (the true positives above the point where the true
FDP first exceeds 5 %). A DA call is false where the true log fold change is 0 or of the
other sign; power counts the cells of the DA regions called with the right sign. The
machine, the command and the run time are printed; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

FDR = 0.05


def oracle_cut(score: np.ndarray, positive: np.ndarray, negative: np.ndarray, alpha: float = FDR) -> int:
    """True positives ranked above the first point where the true FDP exceeds ``alpha``.

    ``score`` ranks (higher first); ``positive`` are true discoveries, ``negative`` false
    ones (items that are neither, e.g. cells at the rim of a DA region, count in neither).
    """
    score = np.where(np.isnan(score), -np.inf, score)
    order = np.argsort(-score, kind="stable")
    fp = np.cumsum(negative[order])
    tp = np.cumsum(positive[order])
    called = np.arange(1, len(order) + 1)
    bad = np.flatnonzero(fp / called > alpha)
    k = bad[0] if len(bad) else len(order)
    return int(tp[k - 1]) if k > 0 else 0


def de_atlas(atlas, args) -> dict:
    """Gene calls of every method on one atlas."""
    from kompot_dask import DifferentialExpression
    from kompot_dask.differential import _relabel
    from kompot_dask.testing import condition_arrays

    c = condition_arrays(atlas)
    truth = np.asarray(atlas.gene_is_de)
    out, times = {}, {}

    t0 = time.perf_counter()
    de_a = DifferentialExpression(n_landmarks=args.landmarks, random_state=0, null_genes=args.genes)
    de_a.fit(c.x1, c.y1, c.x2, c.y2)
    ra = de_a.predict(de_a.computed_landmarks, compute_mahalanobis=True)
    times["a_nullgenes"] = time.perf_counter() - t0
    out["a_nullgenes"] = (ra["is_de"], ra["mahalanobis_distances"])

    t0 = time.perf_counter()
    de_b = DifferentialExpression(n_landmarks=args.landmarks, random_state=0, null_genes=args.genes,
                                  replicate_null=False)  # its calls are timed one by one below
    de_b.fit(c.x1, c.y1, c.x2, c.y2, condition1_sample_indices=c.samples1, condition2_sample_indices=c.samples2)
    rb = de_b.predict(de_b.computed_landmarks, compute_mahalanobis=True)
    times["b_nullgenes_sv"] = time.perf_counter() - t0
    out["b_nullgenes_sv"] = (rb["is_de"], rb["mahalanobis_distances"])

    t0 = time.perf_counter()
    tc = de_b.compute_replicate_fdr(balance=None, tail="empirical")
    times["c_relabel"] = time.perf_counter() - t0
    out["c_relabel"] = (tc["is_de"].to_numpy(), tc["mahalanobis"].to_numpy())

    t0 = time.perf_counter()
    td = de_b.compute_replicate_fdr(balance=args.regions, tail="empirical")
    times["d_relabel_bal"] = time.perf_counter() - t0
    out["d_relabel_bal"] = (td["is_de"].to_numpy(), td["mahalanobis"].to_numpy())
    e = _relabel.replicate_fdr(de_b.replicate_null_result, FDR, tail="gpd")
    out["e_relabel_bal_gpd"] = (e["is_de"], td["mahalanobis"].to_numpy())
    times["e_relabel_bal_gpd"] = times["d_relabel_bal"]

    rows = {}
    for name, (calls, dist) in out.items():
        calls = np.asarray(calls, dtype=bool)
        rows[name] = {
            "called": int(calls.sum()),
            "false": int((calls & ~truth).sum()),
            "true": int((calls & truth).sum()),
            "oracle": oracle_cut(np.asarray(dist, float), truth, ~truth) if truth.any() else 0,
            "seconds": round(times[name], 2),
        }
    return {"n_de": int(truth.sum()), "methods": rows}


def da_atlas(atlas, args) -> dict:
    """Cell calls of every method on one atlas."""
    from kompot_dask import DifferentialAbundance
    from kompot_dask.testing import condition_arrays

    c = condition_arrays(atlas)
    true_lfc = np.asarray(atlas.true_lfc)
    in_region = np.asarray(atlas.cell_is_da)
    rows = {}
    for sv in (False, True):
        t0 = time.perf_counter()
        da = DifferentialAbundance(n_landmarks=args.landmarks, random_state=0)
        kw = dict(condition1_sample_indices=c.samples1, condition2_sample_indices=c.samples2) if sv else {}
        da.fit(c.x1, c.x2, **kw)
        r = da.predict(atlas.x, spatial_fdr=FDR)
        seconds = time.perf_counter() - t0
        lfc = r["log_fold_change"]
        right = np.sign(lfc) == np.sign(true_lfc)
        positive = in_region & right
        negative = (true_lfc == 0) | ~right
        tag = "sv" if sv else "nosv"
        orc = oracle_cut(np.abs(r["log_fold_change_zscore"]), positive, negative) if in_region.any() else 0
        for kind, direction in (("kompot_direction", r["log_fold_change_direction"]),
                                ("spatial_fdr", r["log_fold_change_spatial_direction"])):
            called = np.asarray(direction) != "neutral"
            rows[f"{kind}_{tag}"] = {
                "called": int(called.sum()),
                "false": int((called & negative).sum()),
                "true": int((called & positive).sum()),
                "oracle": orc,
                "seconds": round(seconds, 2),
            }
    return {"n_da": int(in_region.sum()), "methods": rows}


def summarise(records: list[dict], kind: str, count_key: str) -> dict:
    """Per method: null any-call rate, mean calls; signal mean FDP, power, oracle power."""
    null = [r for r in records if r["effect"] == "null" and kind in r]
    signal = [r for r in records if r["effect"] == "signal" and kind in r]
    methods = list((null or signal)[0][kind]["methods"]) if (null or signal) else []
    out = {}
    for m in methods:
        row = {}
        if null:
            called = np.array([r[kind]["methods"][m]["called"] for r in null])
            row.update(null_atlases=len(null), null_any_call=float(np.mean(called > 0)),
                       null_mean_called=float(called.mean()))
        if signal:
            s = [r[kind]["methods"][m] for r in signal]
            n_pos = np.array([r[kind][count_key] for r in signal], dtype=float)
            called = np.array([x["called"] for x in s], dtype=float)
            false = np.array([x["false"] for x in s], dtype=float)
            true = np.array([x["true"] for x in s], dtype=float)
            oracle = np.array([x["oracle"] for x in s], dtype=float)
            fdp = np.where(called > 0, false / np.maximum(called, 1), 0.0)
            power = float(np.mean(true / n_pos))
            oracle_power = float(np.mean(oracle / n_pos))
            row.update(signal_atlases=len(signal), signal_mean_fdp=float(fdp.mean()),
                       signal_max_fdp=float(fdp.max()), signal_mean_called=float(called.mean()),
                       signal_power=power, oracle_power=oracle_power,
                       power_vs_oracle=(power / oracle_power) if oracle_power > 0 else None)
        secs = [r[kind]["methods"][m]["seconds"] for r in null + signal]
        row["mean_seconds"] = float(np.mean(secs))
        out[m] = row
    return out


def print_table(title: str, table: dict) -> None:
    print(f"\n{title}")
    head = (f"{'method':22s} {'null any-call':>13s} {'null mean':>9s} {'signal FDP':>10s} {'max FDP':>8s} "
            f"{'power':>7s} {'oracle':>7s} {'pow/orc':>7s} {'called':>7s} {'sec':>6s}")
    print(head)
    print("-" * len(head))
    for m, r in table.items():
        ratio = r.get("power_vs_oracle")
        print(f"{m:22s} {r.get('null_any_call', float('nan')):13.2f} {r.get('null_mean_called', float('nan')):9.1f} "
              f"{r.get('signal_mean_fdp', float('nan')):10.3f} {r.get('signal_max_fdp', float('nan')):8.3f} "
              f"{r.get('signal_power', float('nan')):7.3f} {r.get('oracle_power', float('nan')):7.3f} "
              f"{'   n/a' if ratio is None else f'{ratio:7.2f}'} {r.get('signal_mean_called', float('nan')):7.1f} "
              f"{r['mean_seconds']:6.1f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--null", type=int, default=20, help="null atlases (default 20)")
    parser.add_argument("--signal", type=int, default=10, help="signal atlases (default 10)")
    parser.add_argument("--quick", action="store_true", help="3 null + 2 signal atlases, a smoke run")
    parser.add_argument("--cells", type=int, default=3000)
    parser.add_argument("--genes", type=int, default=500)
    parser.add_argument("--samples", type=int, default=3, help="samples per condition")
    parser.add_argument("--landmarks", type=int, default=300)
    parser.add_argument("--de-strength", type=float, default=2.0, help="DE effect, log-rate scale (default 2)")
    parser.add_argument("--da-strength", type=float, default=1.0, help="DA log fold change (default 1)")
    parser.add_argument("--regions", type=int, default=30, help="regions of the balancing weights (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="null atlas i has seed+i, signal atlas i seed+1000+i")
    parser.add_argument("--no-da", action="store_true", help="skip the abundance calls")
    parser.add_argument("--no-de", action="store_true", help="skip the expression calls")
    parser.add_argument("--details", help="write every atlas's record to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.null, args.signal = min(args.null, 3), min(args.signal, 2)

    from kompot_dask.testing import simulate_atlas

    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + (sys.argv[1:] if argv is None else argv))
    print(f"command: {command}")
    print(f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | cpus={os.cpu_count()} "
          f"| python {platform.python_version()} | numpy {np.__version__}", flush=True)
    start = time.perf_counter()
    plan = [("null", args.seed + i) for i in range(args.null)] + [("signal", args.seed + 1000 + i)
                                                                  for i in range(args.signal)]
    records = []
    for effect, seed in plan:
        t0 = time.perf_counter()
        atlas = simulate_atlas(args.cells, args.genes, args.samples, effect=effect, seed=seed,
                               de_strength=args.de_strength, da_strength=args.da_strength)
        rec = {"effect": effect, "seed": seed}
        if not args.no_de:
            rec["de"] = de_atlas(atlas, args)
        if not args.no_da:
            rec["da"] = da_atlas(atlas, args)
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        records.append(rec)
        brief = {k: {m: v["called"] for m, v in rec[k]["methods"].items()} for k in ("de", "da") if k in rec}
        print(f"{effect} seed={seed} {rec['seconds']} s called: {json.dumps(brief)}", flush=True)
        if args.details:
            with open(args.details, "w") as fh:
                json.dump({"args": vars(args), "records": records}, fh)
    elapsed = time.perf_counter() - start

    summary = {"benchmark": "calibration", "command": command, "seconds": round(elapsed, 1),
               "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
               "settings": {k: getattr(args, k) for k in ("null", "signal", "cells", "genes", "samples", "landmarks",
                                                          "de_strength", "da_strength", "regions", "seed")},
               "fdr": FDR}
    if not args.no_de:
        summary["de"] = summarise(records, "de", "n_de")
        print_table(f"DE gene calls at FDR {FDR:.0%} ({args.null} null, {args.signal} signal atlases; "
                    f"{args.cells} cells x {args.genes} genes, {args.samples}+{args.samples} samples)", summary["de"])
    if not args.no_da:
        summary["da"] = summarise(records, "da", "n_da")
        print_table(f"DA cell calls ({args.null} null, {args.signal} signal atlases)", summary["da"])
    print(f"\ntotal {elapsed:.0f} s")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
