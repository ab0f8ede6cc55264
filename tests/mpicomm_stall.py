"""``mpiexec -n 2 python mpicomm_stall.py``: raw mpi comms between two data-plane peers.
Rank 1 connects to rank 0's ``mpi://`` listener, sends one message, then an announcement
of a 10 MB frame over MPI that never comes; rank 0's next read must end in CommClosedError
within the stall bound (2 s here), not hang. Then a fresh connection: rank 1 closes it and
rank 0's read ends in CommClosedError at once. Prints RESULT lines."""
import asyncio
import json
import sys
import time

from mpi4py import MPI

from dask_mpi_launch.dataplane import backend

world = MPI.COMM_WORLD
rank = world.Get_rank()
dp = world.Dup()
eng = backend.join(dp, stall_timeout=2.0)


def result(name, value):
    print(f"RESULT {name}={json.dumps(value)}", flush=True)


async def server():
    from distributed.comm import CommClosedError, listen

    outcomes = asyncio.Queue()

    async def handle(comm):
        first = await comm.read()
        t0 = time.monotonic()
        try:
            await comm.read()
            await outcomes.put((first, "no error", time.monotonic() - t0))
        except CommClosedError as e:
            await outcomes.put((first, f"CommClosedError: {e}", time.monotonic() - t0))

    async with listen("mpi://127.0.0.1:0", handle) as listener:
        world.bcast(listener.contact_address, root=0)
        for _ in range(2):
            first, what, dt = await asyncio.wait_for(outcomes.get(), 60)
            name = "stalled" if first == {"hello": 1} else "closed"
            result(name, {"first": first, "error": what, "seconds": round(dt, 3),
                          "peer": isinstance(first, dict)})


async def client():
    from distributed.comm import connect

    addr = world.bcast(None, root=0)
    comm = await connect(addr, timeout=30)
    result("comm_class", type(comm).__name__)
    await comm.write({"hello": 1})
    _, big = backend.split_frames([bytes(10**7)])
    comm._write_frames([backend.pack_announce(eng.new_tag(), True, big), b""])  # no frame
    comm2 = await connect(addr, timeout=30)
    await comm2.write({"hello": 2})
    await asyncio.sleep(0.5)
    await comm2.close()
    await asyncio.sleep(4)
    comm.abort()


asyncio.run(server() if rank == 0 else client())
world.Barrier()
backend.shutdown()
sys.exit(0)
