"""What the machine and the batch system say: the launchers' environment (rank, local rank,
node, job id under Hydra, PRRTE, Slurm, PMIx, Grid Engine, PBS, LSF), the allocation's
resources, and loading MPI itself. May import ``base`` only.
"""
