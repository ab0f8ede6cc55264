"""Sum a random dask.array on the cluster that dask-mpi-launch started.

    mpiexec -n 4 dask-mpi-launch examples/array_sum.py [SIZE]
"""
import sys
import time

import dask.array as da
from distributed import Client

size = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
client = Client()  # no arguments: dask-mpi-launch tells it where the scheduler is
workers = client.scheduler_info()["workers"]
print(f"connected to {client.scheduler.address} with {len(workers)} workers")

start = time.perf_counter()
x = da.ones((size, size), chunks=(size // 4, size // 4))
total = (x + x.T).sum().compute()
print(f"sum of 2 x ones({size}, {size}) = {total:.0f} (expected {2 * size * size}) "
      f"in {time.perf_counter() - start:.2f} s on {len(workers)} workers")
sys.exit(0 if total == 2 * size * size else 1)
