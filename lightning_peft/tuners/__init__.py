"""Tuners: one sub-package each, registering itself with `registry.register_tuner` when imported."""
