"""Memory held after `fit` for a later un-merge (issue 14): bytes of tensors that PEFTCallback and the module's
adapter states keep beyond the module's own parameters and buffers, once `trainer.fit` has returned.

    python bench/bench_held_after_fit.py

GPT-2-style model (6 x 512, vocab 8192, as bench/common.py's), LoRA r=8 on every linear layer ("all-linear"), 2 steps
with PEFTCallback (merge_on_train_end=True, export="last"). Compared with commit 668dbc3, which merged the module in
place at the end of fit and kept `_merge_snapshot`: a CPU copy of the adapter and of every base tensor a merge
overwrites. That figure is recomputed here with 668dbc3's rule (the trainable tensors plus every tensor of each
tuner layer's base layer), on the same trained model.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile

import torch
from common import cpu_trainer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tensors(obj, seen, out, depth=0):
    """Every tensor reachable from `obj` through attributes, dicts, lists and tuples (not through nn.Modules' own
    parameters: those are counted by the caller)."""
    if id(obj) in seen or depth > 12:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        return
    if isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, seen, out, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _tensors(v, seen, out, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for v in vars(obj).values():
            _tensors(v, seen, out, depth + 1)


def main() -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import GPT2Config, GPT2LMHeadModel

    import lightning_peft as lp
    from lightning_peft.lightning import PEFTCallback
    from lightning_peft.lightning._state import get_states
    from lightning_peft.tuners.base import BaseTunerLayer

    torch.manual_seed(0)
    config = GPT2Config(n_layer=6, n_embd=512, n_head=8, vocab_size=8192, n_positions=128)

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = GPT2LMHeadModel(config)

        def training_step(self, batch, _):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    module = Lit()
    callback = PEFTCallback(lp.LoraConfig(r=8, target_modules="all-linear"), export="last")
    data = DataLoader(TensorDataset(torch.randint(0, 8192, (4, 64))), batch_size=2)
    with tempfile.TemporaryDirectory() as root:
        trainer = cpu_trainer(root, max_steps=2, callbacks=[callback])
        trainer.fit(module, data)
    del trainer
    gc.collect()
    own = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    reachable: dict[int, int] = {}
    seen: set[int] = {id(module)}  # the module's own tensors are not "held for an un-merge"
    for state in get_states(module).values():
        for name, value in vars(state).items():
            if name != "peft":  # the model itself
                _tensors(value, seen, reachable)
    for name, value in vars(callback).items():
        if name not in ("_applied",):
            _tensors(value, seen, reachable)
    held_now = sum(n for ptr, n in reachable.items() if ptr not in own)
    probe: dict[int, int] = {}  # the walk does see a tensor kept on a state (as 668dbc3's `_snapshot` was)
    _tensors({"_snapshot": {"w": torch.zeros(10)}}, set(), probe)
    assert sum(probe.values()) == 40

    peft = next(iter(get_states(module).values())).peft
    adapter_bytes = sum(p.numel() * p.element_size() for p in peft.parameters() if p.requires_grad)
    # 668dbc3's _merge_snapshot: trainable tensors + every tensor under each tuner layer's base layer, copied to CPU
    names = {id(m): n for n, m in peft.named_modules()}
    prefixes = tuple(names[id(m.get_base_layer())] + "." for m in peft.modules() if isinstance(m, BaseTunerLayer))
    held_then = sum(
        v.numel() * v.element_size()
        for k, v in peft.state_dict(keep_vars=True).items()
        if v.requires_grad or k.startswith(prefixes)
    )
    model_bytes = sum(p.numel() * p.element_size() for p in peft.get_base_model().parameters() if not p.requires_grad)
    print("| measure | 668dbc3 (merge in place + snapshot) | now |")
    print("|---|---|---|")
    print(f"| bytes held after fit for an un-merge | {held_then:,d} | {held_now:,d} |")
    print(
        f"| ... / adapter bytes ({adapter_bytes:,d}) | {held_then / adapter_bytes:.1f}x "
        f"| {held_now / adapter_bytes:.2f}x |"
    )
    print(
        f"| ... / base model bytes ({model_bytes:,d}) | {held_then / model_bytes:.0%} | {held_now / model_bytes:.0%} |"
    )


if __name__ == "__main__":
    main()
