"""``python -m dask_mpi_launch``: the same as the ``dask-mpi-launch`` command."""
from dask_mpi_launch.cli import main

if __name__ == "__main__":
    main()
