"""client.map over N inputs (N from the command line, default 100)."""
import sys

from distributed import Client


def square(i):
    return i * i


n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
client = Client()
futures = client.map(square, range(n))
results = client.gather(futures)
print(f"results={results}")
print(f"sum={sum(results)}")
print(f"workers={len(client.scheduler_info()['workers'])}")
