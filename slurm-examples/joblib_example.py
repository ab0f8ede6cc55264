"""joblib.Parallel on the job's Dask workers (code written for joblib, e.g. scikit-learn's
n_jobs, runs there unchanged inside the "with" block). Needs: pip install joblib."""
import sys

import joblib
from distributed import Client, get_worker


def square(i):
    return i * i, get_worker().address  # get_worker() fails unless run on a Dask worker


n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
client = Client()
with joblib.parallel_backend("dask"):
    out = joblib.Parallel(n_jobs=-1)(joblib.delayed(square)(i) for i in range(n))
results = [value for value, _ in out]
workers = client.scheduler_info()["workers"]
print(f"sum={sum(results)}")
print(f"ran_on_workers={all(address in workers for _, address in out)}")
print(f"workers={len(workers)}")
