"""A small Dask job whose answer is known: the sum of a 2000 x 2000 array of ones.

Run by dask-mpi-launch (mpiexec-script.sge): Client() with no
arguments connects to the job's own cluster, once every worker is connected.
"""
import dask.array as da
from distributed import Client

client = Client()
x = da.ones((2000, 2000), chunks=(500, 500))  # 16 chunks spread over the workers
print(f"result={int(x.sum().compute())}")
print(f"workers={len(client.scheduler_info()['workers'])}")
