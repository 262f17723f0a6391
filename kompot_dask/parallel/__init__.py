"""Store-backed predictions (kept as entry points for existing code).

``predict_abundance`` / ``predict_expression`` run the differential pipeline into a zarr
store; the cluster helpers live in :mod:`kompot_dask.execution`.
"""

from ..execution.cluster import JaxWorkerSetup, active_client, get_client
from .predict import predict_abundance, predict_expression

__all__ = ["JaxWorkerSetup", "active_client", "get_client", "predict_abundance", "predict_expression"]
