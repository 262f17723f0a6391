"""Execution: where and in what pieces work runs. No math, no models, no I/O.

:mod:`.plan` is the one chunk planner (row slices, cells per chunk, the memory-target block
plan); :mod:`.reduce` sums per-chunk terms in this process or on a dask cluster;
:mod:`.cluster` finds or starts a ``distributed`` client and :mod:`.versions` checks
that its workers run the same software; :mod:`.runner` runs task graphs.
"""

from .cluster import JaxWorkerSetup, active_client, get_client, prepare_client
from .versions import check_versions

__all__ = ["JaxWorkerSetup", "active_client", "check_versions", "get_client", "prepare_client"]
