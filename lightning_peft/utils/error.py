"""Exception classes with HF PEFT's names (`peft.utils.error`), so code that catches them works unchanged."""

from __future__ import annotations


class PeftError(Exception):
    """The base of lightning_peft's own exception classes (HF PEFT's `PeftError`)."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """An adapter's `target_modules` matched no module of the model. A `ValueError` too, as in HF PEFT, so code
    that catches `ValueError` for it still does."""
