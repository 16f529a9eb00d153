"""Hydra config tree, shipped inside the package as ``kvbench.conf``."""
