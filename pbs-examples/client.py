"""A small Dask job whose answer is known: the sum of a 2000 x 2000 array of ones.

Run by dask-mpi-launch (script.pbs / script.lsf): Client() with no arguments connects to
the job's own cluster, once every worker is connected.
"""
import dask.array as da
from distributed import Client

client = Client()
x = da.ones((2000, 2000), chunks=(500, 500))  # 16 chunks spread over the workers
print(f"result={int(x.sum().compute())}")
workers = client.scheduler_info()["workers"].values()
print(f"workers={len(workers)}")
print(f"threads_per_worker={','.join(sorted({str(w['nthreads']) for w in workers}))}")
