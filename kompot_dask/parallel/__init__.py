"""dask orchestration: clusters, block tasks, resumable zarr results. No math lives here."""

from .cluster import JaxWorkerSetup, active_client, get_client
from .predict import predict_abundance, predict_expression

__all__ = ["JaxWorkerSetup", "active_client", "get_client", "predict_abundance", "predict_expression"]
