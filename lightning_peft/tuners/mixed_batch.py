"""Mixed-adapter batches: `model(..., adapter_names=["a", "__base__", "b", ...])` runs each sample of the batch
through its own adapter ("__base__": the base model alone), as HF PEFT does for LoRA.

For the duration of one call, the tuner hands every layer that takes part (LoRA layers, saved-module wrappers)
the same `MixedBatch`; the layers read it instead of their active adapters, and the tuner takes it back when the
call ends, however it ends. Nothing is registered on the modules (no hooks), and a layer without one runs its
usual path.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

BASE_NAME = "__base__"  # the per-sample name of "no adapter", as in HF PEFT
# HF PEFT's refusal of `adapter_names` while an adapter is merged (raised by the tuner and by each layer)
MERGED_REFUSAL = "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."

Rows = Union[slice, torch.Tensor]


class MixedBatch:
    """The per-sample adapter names of one call, grouped: for each adapter the rows of the batch it runs on (a
    slice where they are consecutive, else an index tensor, made once per device for all layers)."""

    __slots__ = ("names", "groups", "_index")

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(self.names):
            groups.setdefault(name, []).append(row)
        self.groups = groups  # in order of first appearance
        self._index: dict[tuple[str, torch.device], Rows] = {}

    def __len__(self) -> int:
        return len(self.names)

    def adapters(self) -> list[str]:
        """The adapter names in the batch ("__base__" left out), in order of first appearance."""
        return [name for name in self.groups if name != BASE_NAME]

    def rows(self, name: str, device: torch.device) -> Rows:
        key = (name, device)
        found = self._index.get(key)
        if found is None:
            rows = self.groups[name]
            if rows[-1] - rows[0] + 1 == len(rows):
                found = slice(rows[0], rows[-1] + 1)
            else:
                found = torch.tensor(rows, dtype=torch.long, device=device)
            self._index[key] = found
        return found

    def repeated(self, times: int) -> "MixedBatch":
        """Each sample's name `times` times in a row (generate() expands every input so for beams / sequences)."""
        return self if times <= 1 else MixedBatch([n for n in self.names for _ in range(times)])


def checked_names(names: Any) -> list[str]:
    """`adapter_names` must be a list (or tuple) of str, one per sample: a single string is refused rather than
    read letter by letter."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"adapter_names must be a list of str, one adapter name (or {BASE_NAME!r}) per sample of the batch; "
            f"got {names!r}"
        )
    return list(names)


def add_rows(result: torch.Tensor, rows: Rows, update: torch.Tensor) -> None:
    """result[rows] += update, in place."""
    if isinstance(rows, slice):
        result[rows] += update
    else:
        result.index_add_(0, rows, update)


def check_batch_size(size: int, batch: MixedBatch) -> None:
    """One name per sample: `size` (the first dimension of a layer's input, or the model's batch) is the batch
    (HF PEFT's check and message)."""
    if size != len(batch):
        raise ValueError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(batch)} and {size} respectively."
        )


def generate_expansion(model: Any, kwargs: dict) -> int:
    """How many rows generate() makes of each input sample (beams / returned sequences): transformers expands the
    inputs by max(num_beams, num_return_sequences), taken from the call, its generation_config, or the model's."""
    config: Optional[Any] = kwargs.get("generation_config") or getattr(model, "generation_config", None)

    def value(key: str) -> int:
        found = kwargs.get(key)
        if found is None and config is not None:
            found = getattr(config, key, None)
        return found if isinstance(found, int) and not isinstance(found, bool) and found > 1 else 1

    return max(value("num_beams"), value("num_return_sequences"))
