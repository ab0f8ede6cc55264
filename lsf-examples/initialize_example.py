"""An existing script made to run on a Dask cluster inside an MPI job: two lines at the top.

Every rank runs this file: initialize() keeps rank 0 as the scheduler and the ranks from 2
on as workers, and returns on rank 1 only, which runs the rest of the script.
"""
from dask_mpi_launch import initialize

initialize()

import dask.array as da  # noqa: E402
from distributed import Client  # noqa: E402

client = Client()  # connects to the cluster started by initialize()
x = da.ones((2000, 2000), chunks=(500, 500))
print(f"result={int(x.sum().compute())}")
print(f"workers={len(client.scheduler_info()['workers'])}")
