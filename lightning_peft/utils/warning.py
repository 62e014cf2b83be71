"""The warning class with HF PEFT's name (`peft.utils.warning`), so warning filters written for it apply."""

from __future__ import annotations


class PeftWarning(UserWarning):
    """The base of the warnings lightning_peft gives where HF PEFT gives a `PeftWarning`."""
