"""Sphinx configuration of dask-mpi-launch's documentation (build: ./bin/docs)."""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # document this checkout, not an installed copy

import dask_mpi_launch  # noqa: E402

project = "dask-mpi-launch"
author = "dask-mpi-launch developers"
copyright = "the dask-mpi-launch developers"
version = release = dask_mpi_launch.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx_click",
]
# offline: no intersphinx, nothing fetched at build time
autodoc_member_order = "bysource"
autodoc_typehints = "description"
exclude_patterns = []
templates_path = []
html_static_path = []
html_theme = "pydata_sphinx_theme"
html_title = "dask-mpi-launch"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_sidebars = {"**": ["sidebar-nav-bs"]}
