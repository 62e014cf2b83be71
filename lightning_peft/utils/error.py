"""Exception classes with HF PEFT's names (`peft.utils.error`), so code that catches them works unchanged."""

from __future__ import annotations


class PeftError(Exception):
    """The base of lightning_peft's own exception classes (HF PEFT's `PeftError`)."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """An adapter's `target_modules` matched no module of the model. A `ValueError` too, as in HF PEFT, so code
    that catches `ValueError` for it still does."""


class AdapterNotFoundError(PeftError, FileNotFoundError, ValueError):
    """An adapter folder (or its `adapter_config.json` / weights file) that is not there. A `FileNotFoundError`, and a
    `ValueError` as HF PEFT raises for it, so code written for either catches it."""


class UnknownNameError(PeftError, ValueError, KeyError):
    """A name looked up that does not exist (an adapter, a `peft_type`). A `ValueError`, and a `KeyError` as HF PEFT
    raises for it (its lookups are dict lookups), so code written for either catches it. Prints as a plain message
    (a `KeyError` would print the repr of its argument, quotes included)."""

    def __str__(self) -> str:
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()
