"""Tuners: one sub-package each, found through `registry`."""
