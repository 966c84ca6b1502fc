"""Offline evaluation jobs: reference statistics of real images (eval-stats), later the `evaluate` command."""
