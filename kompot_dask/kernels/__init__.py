"""Pure math kernels: JAX (float64) and numpy/scipy, no dask, xarray or I/O.

Every function here works on one in-memory block. Whatever spans many cells is written
as a per-chunk term plus a combine step, so the orchestration layers only schedule.
"""
