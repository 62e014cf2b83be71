"""The fused LoRA path's dropout mask on CPU for p <= 0.25: drop positions drawn as Geometric(p) gaps.

The mask must be i.i.d. Bernoulli per entry, like nn.Dropout's (the draw itself differs for a given seed):
drop rate, per-row counts against the binomial, no dependence between neighbours or periodicity,
the same mask for the same seed, and the fused layer's values and gradients consistent with that mask.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_peft.tuners.lora import Linear, fused


def _chi2_bound(dof: int) -> float:
    """A generous upper bound for a chi-square statistic with `dof` degrees of freedom: its mean plus six
    standard deviations, plus 10 (above the 1e-4 quantile for every dof used here; a fixed seed anyway)."""
    return dof + 6.0 * math.sqrt(2.0 * dof) + 10.0


def _mask(n: int, p: float, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[fused.drop_positions(n, p)] = True
    return dropped


@pytest.fixture(scope="module", params=[0.05, 0.2])
def sample(request):
    p = request.param
    return p, _mask(480_000, p, seed=123)  # divisible by every row length / period below


def test_positions_are_sorted_distinct_and_in_range():
    torch.manual_seed(0)
    for n, p in ((1, 0.05), (7, 0.25), (1000, 0.01), (100_000, 0.1)):
        pos = fused.drop_positions(n, p)
        assert pos.dtype == torch.int64
        assert bool((pos[1:] > pos[:-1]).all()) and (pos.numel() == 0 or 0 <= int(pos[0]) and int(pos[-1]) < n)
    assert fused.drop_positions(0, 0.1).numel() == 0
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="p must be in"):
            fused.drop_positions(10, bad)


def test_drop_rate(sample):
    p, dropped = sample
    n = dropped.numel()
    count = int(dropped.sum())
    assert abs(count - n * p) < 5 * math.sqrt(n * p * (1 - p)), (count, n * p)


def test_per_row_counts_follow_the_binomial(sample):
    p, dropped = sample
    row = 40
    counts = dropped.view(-1, row).sum(1)
    rows = counts.numel()
    # bins 0..k-1 and ">= k", k chosen so every expected count is large
    pmf = [math.comb(row, k) * p**k * (1 - p) ** (row - k) for k in range(row + 1)]
    mean = row * p
    ks = [k for k in range(row + 1) if rows * pmf[k] >= 50]
    lo, hi = ks[0], ks[-1]
    observed = [int((counts <= lo).sum())] + [int((counts == k).sum()) for k in range(lo + 1, hi)]
    observed.append(int((counts >= hi).sum()))
    expected = [rows * sum(pmf[: lo + 1])] + [rows * pmf[k] for k in range(lo + 1, hi)] + [rows * sum(pmf[hi:])]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    assert chi2 < _chi2_bound(len(observed) - 1), (observed, expected)
    assert abs(float(counts.float().mean()) - mean) < 0.05 * mean


def test_neighbours_are_independent(sample):
    # joint frequencies of (drop at i, drop at i + lag) against p^2, p(1-p), (1-p)p, (1-p)^2
    p, dropped = sample
    n = dropped.numel()
    for lag in (1, 2, 3, 7, 64):
        a, b = dropped[:-lag], dropped[lag:]
        observed = [int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum()), int((~a & ~b).sum())]
        m = n - lag
        expected = [m * p * p, m * p * (1 - p), m * (1 - p) * p, m * (1 - p) ** 2]
        chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
        assert chi2 < _chi2_bound(3), (lag, observed, expected)


def test_no_periodicity(sample):
    # the drop rate is the same in every residue class modulo small periods (a period would show here)
    p, dropped = sample
    for period in (2, 4, 6, 8, 10, 16):
        counts = dropped.view(-1, period).sum(0).double()
        total = dropped.numel() // period
        chi2 = float((((counts - total * p) ** 2) / (total * p * (1 - p))).sum())  # binomial variance per class
        assert chi2 < _chi2_bound(period - 1), (period, counts.tolist())


def test_gaps_are_geometric(sample):
    # gap g between consecutive drops: P(g = k) = (1-p)^(k-1) p; binned with a tail bin
    p, dropped = sample
    gaps = torch.nonzero(dropped).flatten().diff()
    total = gaps.numel()
    top = max(k for k in range(1, 200) if total * (1 - p) ** (k - 1) * p >= 50)
    top = min(top, 16)
    observed = [int((gaps == k).sum()) for k in range(1, top)] + [int((gaps >= top).sum())]
    expected = [total * (1 - p) ** (k - 1) * p for k in range(1, top)] + [total * (1 - p) ** (top - 1)]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    assert chi2 < _chi2_bound(len(observed) - 1), (observed, expected)


def test_same_seed_same_mask_and_chunking_does_not_change_it(monkeypatch):
    a, b, c = _mask(50_000, 0.05, 7), _mask(50_000, 0.05, 7), _mask(50_000, 0.05, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # chunks far too short for n: the sampler continues from the last drop, one gap after another, so the
    # result is the very same draw (the same stream of gaps) as with one chunk
    monkeypatch.setattr(fused, "_CHUNK_SIGMAS", -30.0)
    chunks = []
    real_rand = torch.rand

    def counting_rand(*args, **kwargs):
        chunks.append(args)
        return real_rand(*args, **kwargs)

    monkeypatch.setattr(fused.torch, "rand", counting_rand)
    short = _mask(50_000, 0.05, 7)
    monkeypatch.undo()
    assert len(chunks) > 1 and torch.equal(short, a)


def _layer(dropout: float, kind: str = "linear") -> Linear:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.Linear(32, 24) if kind == "linear" else Conv1D(24, 32)
    base.requires_grad_(False)
    return Linear(
        base,
        "default",
        r=4,
        lora_alpha=12,
        lora_dropout=dropout,
        fan_in_fan_out=kind == "conv1d",
        init_lora_weights=False,
    ).train()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fused_layer_uses_the_sampled_mask_forward_and_backward(kind):
    p = 0.1
    layer = _layer(p, kind)
    x = torch.randn(4, 50, 32) + 3.0  # no zeros in x: a dropped entry is visible in A's gradient
    weight_out = torch.linspace(-1, 1, 24)

    torch.manual_seed(5)
    xf = x.clone().requires_grad_(True)
    out = layer(xf)
    (out * weight_out).sum().backward()
    grads = {n: q.grad.clone() for n, q in layer.named_parameters() if q.grad is not None}
    for q in layer.parameters():
        q.grad = None

    # the reference: the op-for-op math with the mask the sampler draws from the same generator state
    torch.manual_seed(5)
    keep = torch.ones(x.numel())
    keep[fused.drop_positions(x.numel(), p)] = 0.0
    xr = x.clone().requires_grad_(True)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    ref = layer.base_layer(xr) + B(A(xr * keep.view(x.shape) / (1 - p))) * layer.scaling["default"]
    (ref * weight_out).sum().backward()

    torch.testing.assert_close(out.detach(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xf.grad, xr.grad, atol=1e-5, rtol=1e-5)
    assert set(grads) == {"lora_A.default.weight", "lora_B.default.weight"}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(layer.named_parameters())[name].grad, atol=1e-4, rtol=1e-5, msg=name)
    # the layer drops about p of A's inputs: the entries of grad_x that carry no adapter share
    dropped = int((keep == 0).sum())
    assert 0 < dropped < x.numel() * 2 * p


def test_dropped_nan_input_gives_zero_to_the_adapter():
    layer = _layer(0.2)
    x = torch.randn(2, 32)
    torch.manual_seed(3)
    pos = fused.drop_positions(x.numel(), 0.2)
    x.view(-1)[pos[0]] = float("nan")
    A = layer.lora_A["default"].weight.detach()
    torch.manual_seed(3)
    with torch.no_grad():
        out = fused._lora_linear(x, layer.base_layer.weight, None, A, layer.lora_B["default"].weight, 1.0, 0.2, False)
    x_lora = out[1]
    assert torch.isfinite(x_lora).all() and float(x_lora.view(-1)[pos[0]]) == 0.0


def test_large_p_and_other_devices_keep_nn_dropout_mask():
    # above GEOMETRIC_MAX_P the mask is nn.Dropout's own draw (tests/test_lora_fused.py checks p = 0.3)
    assert fused.GEOMETRIC_MAX_P < 0.3
    x = torch.randn(8, 16) + 3.0
    torch.manual_seed(1)
    x_lora, mask = fused._dropped_copy(x, 0.5)
    torch.manual_seed(1)
    expected = nn.functional.dropout(x, 0.5) * 0.5
    assert mask.dtype == torch.bool
    torch.testing.assert_close(x_lora, expected)


def test_deterministic_algorithms_mode_gives_the_same_mask():
    layer = _layer(0.1)
    x = torch.randn(3, 20, 32) + 3.0
    outputs = []
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            torch.manual_seed(11)
            xr = x.clone().requires_grad_(True)
            layer(xr).sum().backward()
            outputs.append(xr.grad)
        finally:
            torch.use_deterministic_algorithms(False)
    # put_ (torch flags it nondeterministic) is swapped for index_fill_ there: the same zeros, the same gradient
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)


def test_backward_keeps_the_positions_and_x_not_a_masked_copy():
    layer = _layer(0.1)
    x = torch.randn(4, 25, 32, requires_grad=True)
    out = layer(x)
    saved = out.grad_fn.saved_tensors
    assert saved[0].data_ptr() == x.data_ptr()  # x itself, no held copy
    assert saved[1].dtype == torch.int64 and 0 < saved[1].numel() < 0.2 * x.numel()
