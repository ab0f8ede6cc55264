"""The ground floor: what every room may use, importing no other room.

Errors and the one place that decides the exit status (``status``), the layout of ranks
(``layout``), the ``Record`` base of every typed value (``record``), the typed messages the
processes send each other (``messages``) and the start-up banner (``banner``). Imports only
the standard library at module level (``dask``/``distributed`` inside functions).
"""
