"""What the three prompt encoders share: output rows for saving, and loading HF PEFT's saved outputs."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from ...config import PICKLE_WEIGHTS_NAME, SAFETENSORS_WEIGHTS_NAME

SAVED_OUTPUT_ONLY = (
    "the saved adapter holds the encoder's output only (HF PEFT's format), not its reparameterisation layers; the "
    "virtual tokens continue as a plain embedding of that output"
)


def builds_direct(config: Any, kind: str) -> bool:
    """Whether an encoder is built as the bare embedding: for inference, or when its config was read from a folder
    holding weights (about to be loaded: HF PEFT's files hold the encoder's output only, so the reparameterisation
    layers would be dropped on load). Those layers are then never built, so no size a file claims for them
    (`encoder_hidden_size`, `encoder_num_layers`) is ever allocated."""
    if config.inference_mode:
        return True
    source = getattr(config, "_source_dir", None)
    if source is None or not any(
        os.path.isfile(os.path.join(source, n)) for n in (SAFETENSORS_WEIGHTS_NAME, PICKLE_WEIGHTS_NAME)
    ):
        return False
    warnings.warn(f"{kind}: {SAVED_OUTPUT_ONLY}", stacklevel=3)
    return True


class PromptEncoderBase(nn.Module):
    """An `embedding` over virtual-token ids, optionally reparameterised by extra layers (`_heads`, applied in
    that order).

    HF PEFT saves only the encoder's output for the virtual tokens, so a loaded adapter is "direct":
    its embedding holds the output and no reparameterisation runs.
    """

    _heads: tuple[str, ...] = ()
    embedding: nn.Embedding

    @property
    def reparameterized(self) -> bool:
        return any(hasattr(self, name) for name in self._heads)

    def output_rows(self) -> torch.Tensor:
        """The encoder's output for every virtual token, shape (rows, width): what HF PEFT saves."""
        if not self.reparameterized:
            return self.embedding.weight
        was_training = self.training
        self.eval()  # deterministic (no LSTM dropout) so the saved rows are what inference will use
        try:
            ids = torch.arange(self.embedding.num_embeddings, device=self.embedding.weight.device)
            return self(ids.unsqueeze(0))[0]
        finally:
            self.train(was_training)

    def load_output_rows(self, rows: torch.Tensor) -> None:
        """Load saved output rows; a reparameterised encoder becomes a direct embedding of them."""
        if self.reparameterized:
            warnings.warn(f"{type(self).__name__}: {SAVED_OUTPUT_ONLY}")
            for name in self._heads:
                if hasattr(self, name):
                    delattr(self, name)
            weight = self.embedding.weight
            self.embedding = nn.Embedding(rows.shape[0], rows.shape[1], device=weight.device, dtype=weight.dtype)
            self.embedding.weight.requires_grad_(weight.requires_grad)
        with torch.no_grad():
            self.embedding.weight.copy_(rows.to(self.embedding.weight.dtype))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """The embedding, then each reparameterisation layer present, in `_heads` order."""
        out = self.embedding(indices)
        for name in self._heads:
            head = getattr(self, name, None)
            if head is not None:
                out = head(out)
                if isinstance(out, tuple):  # an LSTM returns (output, state)
                    out = out[0]
        return out
