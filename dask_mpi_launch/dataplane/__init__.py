"""Data over MPI: the ``mpi://`` comm backend that distributed loads by entry point, and
its progress engine. Used only with ``--protocol mpi``. May import the rooms below it.
"""
