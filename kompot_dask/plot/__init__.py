"""Figures of stored Kompot results (``kompot_dask.da`` / ``kompot_dask.de`` or Kompot 0.8.0).

Every plot finds its data through the run provenance in ``adata.uns`` (SPEC §7.6): the
field names of run ``run_id`` (default: the latest) of ``uns["kompot_da"]`` or
``uns["kompot_de"]``. matplotlib (``pip install 'kompot-dask[plots]'``) and pandas are
imported when a function is called, not when this package is imported.

Functions
---------
resolve_fields, get_run_info
    The field names, conditions and thresholds of a stored run.
volcano_da
    Per-cell log fold change against −log10 PTP, coloured by direction.
volcano_de
    Per-gene mean log fold change against Mahalanobis distance (or −log10 PTP).
embedding
    Cells in a 2-D embedding coloured by DA fields, a gene's fold change or an obs column.
gene_expression
    One gene: imputed expression per condition and its fold change.
direction_barplot
    Up / neutral / down cells per category of an obs column.

Each returns the new matplotlib Figure, or the given axes; ``save=PATH`` writes a PNG.
"""

from .barplot import direction_barplot, direction_counts
from .embedding import embedding, gene_expression
from .fields import RunFields, get_run_info, resolve_fields
from .volcano import volcano_da, volcano_de

__all__ = [
    "RunFields",
    "get_run_info",
    "resolve_fields",
    "volcano_da",
    "volcano_de",
    "embedding",
    "gene_expression",
    "direction_barplot",
    "direction_counts",
]
