"""Public gene-level FDR from null genes (SPEC §6.7): a labelled table and its summary.

The numbers come from :mod:`kompot_dask.kernels.fdr`; this module only adds gene labels.
pandas is imported inside the functions, so importing the package does not load it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .kernels.fdr import compute_fdr_arrays

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["FDR_COLUMNS", "compute_fdr", "summarize_fdr"]

FDR_COLUMNS = ("mahalanobis", "pvalue", "local_fdr", "tail_fdr", "is_de")


def compute_fdr(
    real: np.ndarray,
    null: np.ndarray,
    threshold: float = 0.05,
    gene_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Empirical p-values, local and tail FDR of real genes against null genes.

    Parameters
    ----------
    real : array_like, shape (n_genes,)
        Mahalanobis distances of the real genes. NaN marks a failed gene: its p-value
        and FDRs are NaN and it is never called DE.
    null : array_like, shape (n_null,)
        Mahalanobis distances of the null (permuted) genes; NaN values are dropped.
    threshold : float, default 0.05
        A gene is DE when its local FDR is below ``threshold``; must lie in ``(0, 1)``.
    gene_names : sequence of str, optional
        Row labels; a ``RangeIndex`` when omitted.

    Returns
    -------
    pandas.DataFrame
        Columns ``mahalanobis, pvalue, local_fdr, tail_fdr, is_de``, one row per gene.

    Raises
    ------
    ValueError
        For a threshold outside ``(0, 1)``, an empty null distribution, or
        ``gene_names`` whose length differs from ``real``.
    """
    import pandas as pd

    arrays = compute_fdr_arrays(real, null, threshold=threshold)
    n_genes = arrays.mahalanobis.size
    if gene_names is None:
        index = pd.RangeIndex(n_genes)
    else:
        index = pd.Index(list(gene_names))
        if len(index) != n_genes:
            msg = (
                f"gene_names has {len(index)} entries but real has {n_genes} distances; "
                "pass one name per real gene."
            )
            raise ValueError(msg)
    return pd.DataFrame(arrays._asdict(), index=index, columns=list(FDR_COLUMNS))


def summarize_fdr(table: pd.DataFrame, threshold: float = 0.05) -> dict[str, Any]:
    """Summary of the DE calls in a :func:`compute_fdr` table.

    Parameters
    ----------
    table : pandas.DataFrame
        Output of :func:`compute_fdr` (needs ``local_fdr`` and ``mahalanobis``).
    threshold : float, default 0.05
        A gene counts as significant when ``local_fdr < threshold``.

    Returns
    -------
    dict
        ``n_significant``, ``n_total``, ``fraction_significant``, ``fdr_threshold`` and
        ``min_significant_mahalanobis`` (``inf`` when no gene is significant).
    """
    local_fdr = np.asarray(table["local_fdr"], dtype=np.float64)
    significant = local_fdr < threshold
    n_significant = int(significant.sum())
    n_total = int(local_fdr.size)
    distances = np.asarray(table["mahalanobis"], dtype=np.float64)[significant]
    return {
        "n_significant": n_significant,
        "n_total": n_total,
        "fraction_significant": n_significant / n_total if n_total else float("nan"),
        "fdr_threshold": float(threshold),
        "min_significant_mahalanobis": float(distances.min()) if n_significant else np.inf,
    }
