"""The Dask side of an HPC job: idle cost and HPC defaults in dask's config, parameters
for many workers, the scheduler plugins. May import the rooms below it.
"""
