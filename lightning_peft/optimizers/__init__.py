"""Optimizers made for adapters, at HF PEFT's import path (`peft.optimizers`)."""

from .loraplus import create_loraplus_optimizer

__all__ = ["create_loraplus_optimizer"]
