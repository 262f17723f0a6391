"""Per-stage arithmetic efficiency of DA and DE at Kompot's defaults, next to a GEMM rate.

    python benchmarks/stages.py --cells 5000 --genes 2000
    python benchmarks/stages.py --cells N --genes G [--landmarks 5000] [--null-genes 2000]
                                [--batch-size 100] [--dims 10] [--samples 3]
                                [--stages fit,impute,variance,sigma,mahalanobis,da] [--de-total]
                                [--kompot-seconds S] [--json out.json]

The atlas is :func:`kompot_dask.testing.simulate_atlas` (two conditions, no sample column).
DE runs at ``de()``'s defaults: ``n_landmarks=5000`` shared k-means landmarks (all cells
when there are at most that many), ``sigma=1``, ``ls_factor=10``, ``batch_size=100``,
2,000 permuted null genes, Mahalanobis at the landmarks. DA runs at ``da()``'s defaults:
no landmarks given, so a full GP per condition of at most 5,000 cells and 5,000 k-means
landmarks of its own for a larger one (:func:`density_flops`), ``d_method="fractal"``.

Each stage is timed on its own, in the order the engine runs them:

========== ==================================================================
fit        ``FunctionEstimator.fit`` of both conditions (real + null genes)
impute     posterior mean of the real genes at every cell, ``batch_size`` cells at a time
variance   posterior variance at every cell, ``batch_size`` cells at a time (both conditions);
           skipped when every cell is a landmark (the engine reads the diagonals of Σc)
sigma      ``Σ1 + Σ2`` at the landmarks (full covariance)
mahalanobis means at the landmarks (all genes; when every cell is a landmark and the impute
           stage ran, only the null genes', the real ones being its fold changes, as in the
           engine), ``chol(Σ + eps I)`` and the distances
da         ``DifferentialAbundance().fit`` + ``predict`` at every cell
========== ==================================================================

For each stage the script prints its floating-point operation count (:func:`stage_flops`,
the formulas below, counted as the algorithm the engine runs now performs them), the
seconds, the achieved rate and its fraction of a numpy float64 GEMM measured in the same run
(``--gemm-size`` square matrices, best of three, before and after the stages). A
triangular solve ``L⁻¹B`` (``L`` m×m, ``B`` m×k) counts ``m² k``, a product of an m×k and a
k×n matrix ``2 m k n``, ``A Aᵀ`` (A m×k) ``m² k``, a Cholesky ``m³/3``, a triangular inverse
``m³/3``. Kernel evaluations count ``2 D`` per entry (the distance GEMM); their
exponentials are not counted. The last line is JSON.

Timings share the machine with whatever else runs: the load average is printed with them,
and each stage's process CPU time (all threads) next to its wall time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from typing import Any, Callable

import numpy as np

STAGES = ("fit", "impute", "variance", "sigma", "mahalanobis", "da")


# ----------------------------------------------------------------------------- machine
def gemm_rate(size: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` numpy float64 ``size``×``size`` matmul rate, GFLOP/s."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((size, size)), rng.standard_normal((size, size))
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best / 1e9


def machine() -> dict:
    """Cores, memory, CPU model and load of this machine."""
    import psutil

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


# ------------------------------------------------------------------------------- flops
def cell_basis_flops(m: int, c: int, g: int) -> tuple[float, float]:
    """``(landmark form, cell form)`` operations of a landmark fit (the engine's own count)."""
    from kompot_dask.kernels.cell_basis import fit_flops

    return fit_flops(m, c, g)


def in_cell_basis(m: int, c: int, g: int) -> bool:
    """Whether the engine fits a condition of ``c`` cells in the cells' basis."""
    landmark, cell = cell_basis_flops(m, c, g)
    return cell < landmark


def stage_flops(stage: str, s: dict) -> float:
    """FLOP count of ``stage`` for the sizes in ``s`` (see the module docstring).

    ``s`` holds ``n1``, ``n2`` (cells per condition), ``n`` (query cells), ``m``
    (landmarks), ``g`` (real genes), ``ga`` (real + null genes), ``d`` (dimensions) and,
    for ``da``, ``nfev1``, ``nfev2`` (objective evaluations of each density fit) and
    ``factor_rows_bytes`` (the option that decides whether a landmark density keeps ``L``).
    """
    n1, n2, n, m, g, ga, d = (s[k] for k in ("n1", "n2", "n", "m", "g", "ga", "d"))
    cells = [c for c in (n1, n2) if in_cell_basis(m, c, ga)]  # conditions fitted in the cells' basis
    if stage == "fit":
        # once: chol(K_UU + jI), shared by the conditions; per condition: the kernel and the
        # cheaper of the two forms of kompot_dask.kernels.cell_basis.fit_flops — landmark:
        # A = Lp⁻¹K_UX, A Aᵀ, A R, chol(B), w = Lp⁻ᵀ LB⁻ᵀ LB⁻¹ (A R) (three solves); cells:
        # A, AᵀA, chol, z (two solves), G = Lp⁻ᵀ A (its w = G z, 2 m c ga, is counted there
        # but formed only when a mean off the landmarks is asked: not in this benchmark)
        # Cells that are the landmarks (every cell one, n == m): no kernel and no solve against
        # Lp per condition (kompot_dask.kernels.cell_basis.fit_at_landmarks), j²P⁻¹ once
        # (trtri + lauum, 2 m³/3), then chol(σ²I + AᵀA) and z per condition.
        if len(cells) == 2 and n == m:
            return m**3 / 3 + 2 * m * m * d + 2 * m**3 / 3 + sum(c**3 / 3 + 2 * c * c * ga for c in cells)

        def per(c):
            landmark, cell = cell_basis_flops(m, c, ga)
            return 2 * m * c * d + (cell - 2 * m * c * ga if cell < landmark else landmark)
        return m**3 / 3 + 2 * m * m * d + per(n1) + per(n2)
    if stage == "impute":
        # both conditions' means from one kernel block K_xU and their weights side by side;
        # fits in the cells' basis, at cells that are the landmarks: (K_xX − jG) z per condition
        if len(cells) == 2 and n == m:
            return sum(2 * n * c * d + 2 * n * c * g for c in cells)
        return 2 * n * m * d + 2 * n * m * (2 * g)
    if stage == "variance":
        # per block: the kernel; landmark form: A = Lp⁻¹k once (both conditions share Lp), then
        # LB⁻¹A per condition; cell form: Gᵀk (GEMM) and Lc⁻¹(Gᵀk) per condition. A landmark-form
        # fit that kept its cells' A (``kept_function``) gives their columns with no kernel or
        # solve (the query cells here are the training cells).
        kept = s.get("kept_function", (False, False))
        unkept = n - sum(c for c, k in zip((n1, n2), kept) if k and c not in cells)
        shared_projection = m * m * unkept if len(cells) < 2 else 0
        return (2 * (n if cells else unkept) * m * d + shared_projection
                + sum(2 * m * c * n + c * c * n for c in cells) + (2 - len(cells)) * m * m * n)
    if stage == "sigma":
        # landmark form: Lp⁻¹ (LAPACK trtri, m³/3) and DᵀD, D = j Lp⁻¹ (lauum, m³/3), once
        # (K_UU − AᵀA = jI − DᵀD); then per condition C = LB⁻¹ (Lpᵀ − D) and CᵀC. Cell form,
        # per condition: the kernels K_UU and K_XU, S = Lc⁻¹ (K_XU − j Gᵀ) and SᵀS.
        shared_inverse = 2 * m**3 / 3 if len(cells) < 2 else 0
        return (shared_inverse + (2 - len(cells)) * 2 * m**3
                + sum(2 * m * m * d + 2 * m * c * d + c * c * m + m * m * c for c in cells))
    if stage == "mahalanobis":
        # Δ = μ2 − μ1 at the landmarks: K_UU (w2 − w1), or in the cells' basis (K_UX − jG) z
        # per condition; then chol(Σ + eps I) and one solve per gene. When the cells are the
        # landmarks, the real genes' Δ is the imputation's fold change (the pipeline's
        # _reused_batches): only the null genes' (``delta_genes``) is predicted here.
        dg = s.get("delta_genes", ga)
        if len(cells) == 2:
            delta = sum(2 * m * c * d + 2 * m * c * dg for c in cells)
        else:
            delta = 2 * m * m * d + 2 * m * m * dg
        return delta + m**3 / 3 + m * m * ga
    if stage == "da":
        kept = s.get("kept_density", (False, False))
        return sum(density_flops(c, s.get(f"nfev{i}", 0), n, d, s.get("factor_rows_bytes"), kept[i - 1])
                   for i, c in ((1, n1), (2, n2)))
    raise ValueError(stage)


def density_flops(c: int, nfev: int, n: int, d: int, rows_bytes: int | None = None, kept: bool = False) -> float:
    """Operations of one ``DensityEstimator`` at ``da()``'s defaults: fit on ``c`` cells
    (``nfev`` objective evaluations), then the log density and its variance at ``n`` cells.

    At most 5,000 cells (a full GP, ``Z = X``): ``chol(K + jI)``; the ridge start in its full
    form ``Lpᵀ (I + K + jI)⁻¹ t`` (a second kernel and Cholesky, two solves, one product: no
    ``LᵀL``); per evaluation ``f = Lp w`` and ``Lpᵀ (1 − e)``; the Laplace diagonal
    (``Lp z``, ``(Lp∘Lp)ᵀ e``); ``w = Lp⁻ᵀ z``. More cells: 5,000 k-means landmarks of the
    condition (its Lloyd steps are in the stage's seconds but not counted here: their number
    is not known outside), ``chol(K_UU + jI)``, the factor rows ``L = K_XU Lp⁻ᵀ`` (kept while
    ``8 c m`` bytes fit in ``rows_bytes``, the ``factor_rows_bytes`` option: otherwise every
    evaluation forms its kernel block again), the ridge start from ``LᵀL`` and
    ``chol(I + LᵀL)``, per evaluation ``L w`` and ``Lᵀ (1 − e)``, the Laplace diagonal and
    ``w``. The prediction at ``n`` cells, in both: the kernel ``K_xZ``, the mean, the solve
    ``B = Lp⁻¹ K_Zx`` and the two variance sums; ``kept``: the landmark fit kept its rows
    of ``L`` for its predictor, so ``B`` at its own ``c`` cells (among the ``n``) is read.
    """
    from kompot_dask.estimators._landmarks import MAX_AUTO_LANDMARKS

    m = min(c, MAX_AUTO_LANDMARKS)
    predict = 2 * n * m * d + 2 * n * m + m * m * (n - c if kept and c > m else n) + 4 * n * m
    if c <= MAX_AUTO_LANDMARKS:
        fit = (2 * m * m * d + m**3 / 3  # chol(K + jI)
               + 2 * m * m * d + m**3 / 3 + 2 * m * m + 2 * m * m  # ridge: chol(I + K + jI), solves, Lpᵀ·
               + nfev * 4 * m * m + 5 * m * m + m * m)  # evaluations, Laplace diagonal, w
        return fit + predict
    kept = rows_bytes is None or 8 * c * m <= rows_bytes
    rows = 2 * m * c * d + m * m * c  # K_XU and the solve against Lp: L
    # an evaluation from kept rows: L w, Lᵀ (1 − e); otherwise from the kernel: K_XU, K_XU w,
    # K_UX (1 − e) and w = Lp⁻ᵀ z
    evaluation = 4 * c * m if kept else 2 * m * c * d + 4 * c * m + m * m
    fit = (2 * m * m * d + m**3 / 3  # chol(K_UU + jI)
           + rows + m * m * c + 2 * c * m + m**3 / 3 + 2 * m * m  # ridge: L, LᵀL, Lᵀt, chol, solves
           + nfev * evaluation + 5 * c * m + (0 if kept else rows) + m * m)  # Laplace diagonal, w
    return fit + predict


# ------------------------------------------------------------------------------ stages
class Inputs:
    """The atlas split by condition, null genes appended, landmarks and length scale."""

    def __init__(self, cells: int, genes: int, null_genes: int, landmarks: int, dims: int, samples: int,
                 seed: int):
        from kompot_dask.differential._expression_model import expression_length_scale
        from kompot_dask.differential._null_genes import draw_null_genes
        from kompot_dask.estimators._landmarks import compute_landmarks
        from kompot_dask.estimators._neighbors import nn_distances
        from kompot_dask.testing import simulate_atlas

        atlas = simulate_atlas(n_cells=cells, n_genes=genes, n_samples=samples, dims=dims, seed=seed)
        first = atlas.condition == atlas.condition[0]
        self.x1, self.x2 = atlas.x[first], atlas.x[~first]
        y = np.asarray(atlas.y, dtype=np.float64)
        self.y1, self.y2 = y[first], y[~first]
        self.x = np.vstack([self.x1, self.x2])
        self.genes = genes
        if null_genes:
            null = draw_null_genes(self.y1, self.y2, null_genes, 42)
            self.y1 = np.hstack([self.y1, null.condition1])
            self.y2 = np.hstack([self.y2, null.condition2])
        t0 = time.perf_counter()
        self.landmarks = compute_landmarks(self.x, "fixed", landmarks, 0)
        self.landmark_seconds = time.perf_counter() - t0
        self.ls = expression_length_scale(nn_distances(self.x1, float32=True), 10.0, True, "x1")

    def sizes(self) -> dict:
        from kompot_dask.options import get_options

        return {"n1": len(self.x1), "n2": len(self.x2), "n": len(self.x), "m": len(self.landmarks),
                "g": self.genes, "ga": self.y1.shape[1], "d": self.x.shape[1],
                "factor_rows_bytes": get_options()["factor_rows_bytes"]}


def batches(n: int, size: int) -> list[slice]:
    return [slice(a, min(a + size, n)) for a in range(0, n, size)]


def run_stages(inp: Inputs, wanted: list[str], batch_size: int) -> tuple[dict, dict]:
    """Time the stages in ``wanted``; return ``(seconds, extra)``.

    ``extra`` holds the process CPU seconds of each stage (all threads: on a busy machine
    they show the work done where the wall time also shows the waiting) and the sizes
    only known after a stage (density objective evaluations).
    """
    from kompot_dask._jax import x64
    from kompot_dask.estimators import FunctionEstimator
    from kompot_dask.differential._expression_model import ConditionModel, condition_means, mean_difference
    from kompot_dask.differential._mahalanobis_inputs import point_rows
    from kompot_dask.kernels import mahalanobis as mk

    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    extra: dict[str, Any] = {"cpu_seconds": cpu}
    state: dict[str, Any] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        seconds[name] = time.perf_counter() - t0
        cpu[name] = time.process_time() - c0
        print(f"  {name:<12s} {seconds[name]:9.2f} s  (cpu {cpu[name]:.1f} s)", flush=True)
        return out

    de_needed = [s for s in wanted if s != "da"]
    if de_needed:
        kwargs = dict(landmarks=inp.landmarks, gp_type="fixed", ls=inp.ls, sigma=1.0, predictor_with_uncertainty=True)
        p1, p2 = timed("fit", lambda: tuple(FunctionEstimator(**kwargs).fit(x, y).predict
                                            for x, y in ((inp.x1, inp.y1), (inp.x2, inp.y2))))
        extra["kept_function"] = [p.kept is not None for p in (p1, p2)]  # the training cells' A, kept
        cells = batches(len(inp.x), batch_size)
        genes = slice(0, inp.genes)
        m1, m2 = ConditionModel(p1), ConditionModel(p2)
        rows = point_rows(inp.x, inp.landmarks)  # the pipeline's test: every cell a landmark
        if "impute" in wanted:
            state["means"] = timed("impute", lambda: [condition_means(m1, m2, inp.x[sl], genes,
                                                                      None if rows is None else rows[sl])
                                                      for sl in cells])
        if "variance" in wanted and rows is not None:
            print("  variance     not a stage here: every cell is a landmark, the engine reads diag Σc")
        elif "variance" in wanted:
            timed("variance", lambda: [p.covariance(inp.x[sl], diag=True) for sl in cells for p in (p1, p2)])
        if "sigma" in wanted or "mahalanobis" in wanted:
            state["sigma"] = timed("sigma", lambda: p1.covariance(inp.landmarks, diag=False)
                                   + p2.covariance(inp.landmarks, diag=False))
        if "mahalanobis" in wanted:
            reuse = rows is not None and "means" in state  # as the pipeline: the fold changes at the cells
            extra["delta_genes"] = inp.y1.shape[1] - (inp.genes if reuse else 0)

            def mahalanobis():
                with x64():
                    if not reuse:
                        delta = mean_difference(m1, m2, inp.landmarks)
                    else:
                        delta = np.empty((len(inp.landmarks), inp.y1.shape[1]))
                        for sl, (mu1, mu2) in zip(cells, state["means"]):
                            delta[rows[sl], :inp.genes] = mu2 - mu1
                        delta[:, inp.genes:] = mean_difference(m1, m2, inp.landmarks, slice(inp.genes, None))
                    return mk.mahalanobis_distances(delta, state["sigma"], 1e-8)
            result = timed("mahalanobis", mahalanobis)
            extra["mahalanobis_branch"] = result.branch
        # the DE models go before DA: what they kept counts against the same factor_rows_bytes
        del p1, p2, m1, m2
        state.clear()
        gc.collect()
    if "da" in wanted:
        from kompot_dask import DifferentialAbundance

        def da():
            model = DifferentialAbundance().fit(inp.x1, inp.x2)
            model.predict(inp.x)
            return model

        model = timed("da", da)
        extra["nfev1"] = int(model.density_estimator1.optimizer_result.nfev)
        extra["nfev2"] = int(model.density_estimator2.optimizer_result.nfev)
        extra["kept_density"] = [getattr(e.predict, "kept", None) is not None
                                 for e in (model.density_estimator1, model.density_estimator2)]
    return seconds, extra


def de_total(inp: Inputs, null_genes: int, landmarks: int, batch_size: int) -> float:
    """Wall time of the real ``DifferentialExpression`` fit + predict with Mahalanobis."""
    from kompot_dask import DifferentialExpression

    t0 = time.perf_counter()
    model = DifferentialExpression(n_landmarks=landmarks, batch_size=batch_size, null_genes=null_genes or None,
                                   random_state=0)
    model.fit(inp.x1, inp.y1[:, :inp.genes], inp.x2, inp.y2[:, :inp.genes], landmarks=inp.landmarks)
    model.predict(inp.x, compute_mahalanobis=True)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------ report
def report(seconds: dict, cpu: dict, sizes: dict, gemm: float, kompot_seconds: float | None = None) -> list[dict]:
    """Print the per-stage table and the arithmetic floor; return the rows."""
    rows = []
    print(f"\n{'stage':<12s} {'GFLOP':>10s} {'seconds':>9s} {'cpu s':>8s} {'GFLOP/s':>9s} {'% GEMM':>7s}")
    for name, sec in seconds.items():
        if name not in STAGES:
            continue
        flop = stage_flops(name, sizes)
        rate = flop / sec / 1e9
        rows.append({"stage": name, "gflop": flop / 1e9, "seconds": sec, "cpu_seconds": cpu.get(name),
                     "gflops": rate, "pct_gemm": 100 * rate / gemm})
        print(f"{name:<12s} {flop / 1e9:10.1f} {sec:9.2f} {cpu.get(name, float('nan')):8.1f} {rate:9.2f} "
              f"{100 * rate / gemm:6.1f}%")
    total = sum(r["seconds"] for r in rows)
    gflop = sum(r["gflop"] for r in rows)
    print(f"{'total':<12s} {gflop:10.1f} {total:9.2f}")
    if rows:
        floor = gflop / gemm
        print(f"every stage at the GEMM rate: {floor:.1f} s (the least time this arithmetic takes on this machine)")
        if kompot_seconds:
            print(f"against Kompot's {kompot_seconds:.1f} s: {kompot_seconds / total:.1f}x as measured here, "
                  f"at most {kompot_seconds / floor:.1f}x at the GEMM rate")
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=5000)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--null-genes", type=int, default=2000)
    ap.add_argument("--landmarks", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--dims", type=int, default=10)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gemm-size", type=int, default=4000)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--de-total", action="store_true", help="also time DifferentialExpression fit + predict")
    ap.add_argument("--kompot-seconds", type=float, help="Kompot's da + de wall time on this atlas (from "
                    "vs_kompot.py): also print the speed-up these stages allow at the GEMM rate")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    wanted = [s for s in args.stages.split(",") if s]
    unknown = set(wanted) - set(STAGES)
    if unknown:
        ap.error(f"unknown stages {sorted(unknown)}; choose from {STAGES}")

    info = machine()
    print(f"machine: {info}")
    gemm_before = gemm_rate(args.gemm_size)
    print(f"numpy float64 GEMM {args.gemm_size}²: {gemm_before:.1f} GFLOP/s")
    inp = Inputs(args.cells, args.genes, args.null_genes, args.landmarks, args.dims, args.samples, args.seed)
    sizes = inp.sizes()
    print(f"sizes: {sizes}, ls={inp.ls:.4g}, batch_size={args.batch_size}, landmarks in {inp.landmark_seconds:.1f} s")
    seconds, extra = run_stages(inp, wanted, args.batch_size)
    sizes.update({k: v for k, v in extra.items() if k.startswith(("nfev", "kept_")) or k == "delta_genes"})
    if args.de_total:
        seconds["de_total"] = de_total(inp, args.null_genes, args.landmarks, args.batch_size)
        print(f"  {'de_total':<12s} {seconds['de_total']:9.2f} s")
    gemm_after = gemm_rate(args.gemm_size)
    gemm = max(gemm_before, gemm_after)
    print(f"numpy float64 GEMM after the stages: {gemm_after:.1f} GFLOP/s; rates below are against {gemm:.1f}")
    rows = report(seconds, extra.get("cpu_seconds", {}), sizes, gemm, args.kompot_seconds)
    info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    out = {"machine": info, "gemm_gflops": [gemm_before, gemm_after], "sizes": sizes, "batch_size": args.batch_size,
           "stages": rows, "seconds": seconds, "extra": extra}
    line = json.dumps(out)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(line + "\n")
    print(line)
    return out


if __name__ == "__main__":
    main()
