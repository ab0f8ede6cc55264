"""The control planes: how ranks tell each other that the job is ready, closing or ended,
over MPI (``over_mpi``) or, where MPI cannot be used, over files (``over_files``). May import
the rooms below it.
"""
