"""What the user asked for: the packaged defaults (``dask-mpi-launch.yaml``), the command
line's options, and the checked ``Settings`` every role reads. May import ``security``,
``hpc`` and ``base``.
"""
