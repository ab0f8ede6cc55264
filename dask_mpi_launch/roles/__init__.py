"""What a process becomes: the scheduler, a worker, the user's script (the client),
JupyterLab, the network check. ``life`` holds how a role lives and ends (its channel to
the rank, flushing, ending as python would). May import the rooms below it.
"""
