"""LoRA initialisations that read the base weight, as HF PEFT 0.21 computes them: PiSSA (`"pissa"`: the top-r
singular triplets, full SVD; `"pissa_niter_K"`: torch's randomised `svd_lowrank` with K subspace iterations), OLoRA
(`"olora"`: the first r columns / rows of a QR decomposition) and LoftQ (`"loftq"`: the base weight quantised (NF4 or
int8) and the low-rank factors fitted to the quantisation error).

All three start the adapter at a non-zero `B A` and change the base weight so the model's output is unchanged at the
start (PiSSA / OLoRA: `W_res = W - scaling * B A`; LoftQ: the base becomes its own quantise-dequantise and `B A`
approximates the error). Which base an adapter then needs:

- saved as is (its config says `init_lora_weights="pissa"` / `"olora"` / `"loftq"`): the ORIGINAL base. Loading
  runs the initialisation again on that base (here as in HF PEFT), which recomputes the residual and then loads the
  trained factors over it. Exact for `"pissa"`, `"olora"` and `"loftq"` (deterministic); `"pissa_niter_K"` draws
  random numbers, so its residual is the same only when torch's random state at load equals the one at creation.
- saved with `save_pretrained(..., path_initial_model_for_weight_conversion=<the adapter saved right after
  creation>)`: a plain LoRA adapter of rank 2r (`init_lora_weights=True`) for the ORIGINAL base, without any
  re-initialisation: `[A | A0]`, `[B | -B0]` give `scaling * (B A - B0 A0)`, the change training made.
- saved after setting the config's `init_lora_weights=True` (HF PEFT's recipe for the "initial" adapter): the
  RESIDUAL base (`unload()` of the created model gives it).

PiSSA / OLoRA apply to Linear and Conv1D layers; on an Embedding they fall back to its default start (A zero, B
normal) and on a Conv2d they are refused (`ValueError`), as in HF PEFT. LoftQ applies to Linear / Conv1D only.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, cast

import torch
from torch import nn

from ...config import short_repr
from ..base import is_linear8bit

if TYPE_CHECKING:
    from .layer import LoraLayer


@dataclass
class LoftQConfig:
    """HF PEFT's LoftQ settings (`LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(...))`): the bits
    of the quantisation the base is fitted to (4: NF4, blocks of 64; 8: int8 row-wise absmax) and the number of
    alternating quantise / SVD iterations."""

    loftq_bits: int = 4
    loftq_iter: int = 1


_NITER = "pissa_niter_"
# the most subspace iterations "pissa_niter_K" takes (torch's default is 2, HF PEFT's examples use 4 to 16): HF PEFT
# takes any K, so an adapter_config.json asking for pissa_niter_99999999999 makes loading run for days
MAX_PISSA_NITER = 1000


def init_kind(init: Any) -> Optional[str]:
    """ "pissa" / "olora" / "loftq" for an initialisation of this file (`pissa_niter_K` is "pissa"), else None."""
    if not isinstance(init, str):
        return None
    if init.startswith("pissa"):
        return "pissa"
    if init.lower() == "olora":
        return "olora"
    return "loftq" if init == "loftq" else None


def check_init(config: Any) -> bool:
    """Validate `init_lora_weights` when it is one of this file's (and `loftq_config` with it), as HF PEFT does
    (`ValueError`); True when it is one of them. `loftq_config` becomes a plain dict (HF PEFT's `vars()` of it)."""
    init = config.init_lora_weights
    kind = init_kind(init)
    if kind is None:
        return False
    if kind == "pissa" and init != "pissa":
        niter = init[len(_NITER) :] if init.startswith(_NITER) else None
        if niter is None:
            raise ValueError(
                f"init_lora_weights should be 'pissa' or 'pissa_niter_[number of iters]', got {short_repr(init)}"
            )
        if not (niter.isascii() and niter.isdigit()):
            raise ValueError(
                f"init_lora_weights={short_repr(init)}: the number of iterations after 'pissa_niter_' must be a "
                "non-negative integer, e.g. 'pissa_niter_4'"
            )
        if len(niter.lstrip("0")) > 4 or int(niter) > MAX_PISSA_NITER:  # (int() of 5000 digits raises)
            raise ValueError(
                f"init_lora_weights={short_repr(init)}: at most {MAX_PISSA_NITER} iterations after 'pissa_niter_' "
                "(each one is a pass over the base weight; 4 to 16 are enough), or 'pissa' for the exact SVD"
            )
    if kind == "loftq":
        loftq = config.loftq_config
        if dataclasses.is_dataclass(loftq) and not isinstance(loftq, type):
            loftq = dataclasses.asdict(loftq)
        if not loftq:
            raise ValueError(
                "loftq_config must be specified when init_lora_weights is 'loftq': "
                "give loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1)"
            )
        if not isinstance(loftq, dict):
            raise TypeError(f"loftq_config must be a LoftQConfig or a dict of it, got {short_repr(loftq)}")
        unknown = sorted(set(loftq) - {"loftq_bits", "loftq_iter"})
        if unknown:
            raise ValueError(f"loftq_config has unknown keys {unknown}; it takes loftq_bits and loftq_iter")
        bits, iters = loftq.get("loftq_bits", 4), loftq.get("loftq_iter", 1)
        if isinstance(bits, bool) or bits not in (4, 8):
            raise ValueError(f"loftq_config['loftq_bits'] must be 4 (NF4) or 8 (int8), got {short_repr(bits)}")
        if isinstance(iters, bool) or not isinstance(iters, int) or iters <= 0:
            raise ValueError(f"loftq_config['loftq_iter'] must be a positive integer, got {short_repr(iters)}")
        config.loftq_config = {"loftq_bits": bits, "loftq_iter": iters}
        if config.lora_alpha != config.r or config.rank_pattern or config.alpha_pattern:
            warnings.warn(  # HF PEFT computes the same start without a word
                f"init_lora_weights='loftq' fits B A to the quantisation error without the scaling (as HF PEFT does), "
                f"so the adapter starts at lora_alpha / r = {config.lora_alpha}/{config.r} times that fit; "
                "use lora_alpha = r (and no rank_pattern / alpha_pattern) to start at the fit",
                stacklevel=4,
            )
    if config.lora_bias:
        raise ValueError(
            f"The argument lora_bias=True is only supported with init_lora_weights=True or False, got "
            f"init_lora_weights={init!r}"
        )
    if kind != "loftq" and config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        warnings.warn(  # HF PEFT's warning: the conversion at save time would be refused
            "Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and PiSSA/OLoRA means that you won't be able "
            "to pass path_initial_model_for_weight_conversion to save_pretrained to restore the initial values of "
            "the base weights; if you intend to do this, do not use rslora with rank_pattern/alpha_pattern",
            stacklevel=4,
        )
    return True


class LoftQInit(str):
    """`"loftq"` as handed to a layer, carrying the config's `loftq_bits` / `loftq_iter`."""

    loftq_bits: int = 4
    loftq_iter: int = 1


def layer_init_argument(config: Any) -> Any:
    """What `_create_and_replace` hands the layers as `init_lora_weights` (inside `base_kept()`: True for this
    file's initialisations, so the base weights stay as they are)."""
    if _KEEP_BASE.get() and init_kind(config.init_lora_weights) is not None:
        return True
    if config.init_lora_weights != "loftq":
        return config.init_lora_weights
    init = LoftQInit("loftq")
    init.loftq_bits = config.loftq_config["loftq_bits"]
    init.loftq_iter = config.loftq_config["loftq_iter"]
    return init


# ---- failed calls: the base weights back as they were ---------------------------------------------------
# (weight parameter, the data it held before an initialisation replaced it) for each replacement made inside
# `base_weights_restored_on_failure()`; None outside one
_JOURNAL: contextvars.ContextVar[Optional[list[tuple[torch.Tensor, torch.Tensor]]]] = contextvars.ContextVar(
    "lora_init_journal", default=None
)
_KEEP_BASE: contextvars.ContextVar[bool] = contextvars.ContextVar("lora_init_keep_base", default=False)


@contextlib.contextmanager
def base_weights_restored_on_failure() -> Iterator[None]:
    """Around a call that may create adapters (get_peft_model, add_adapter, load_adapter, from_pretrained): when it
    fails (an exception, an interrupt during a long SVD, a refused weights file after the adapter was built), every
    base weight PiSSA / OLoRA / LoftQ replaced in it gets its original tensor back, so the user's model is not left
    as a residual. The replaced tensors are held until the call ends (a copy in CPU memory for an accelerator's
    weight, so the device's peak memory is not doubled). Nested uses: the outermost one restores."""
    if _JOURNAL.get() is not None:
        yield
        return
    journal: list[tuple[torch.Tensor, torch.Tensor]] = []
    token = _JOURNAL.set(journal)
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for weight, old in reversed(journal):
                weight.data = old.to(weight.device)
        raise
    finally:
        _JOURNAL.reset(token)
        journal.clear()


@contextlib.contextmanager
def base_kept() -> Iterator[None]:
    """Adapters (re)built inside start as plain LoRA (the weights to load follow) and leave the base weights alone:
    rebuilding an existing PiSSA / OLoRA / LoftQ adapter must not run the initialisation again on the base it
    already changed."""
    token = _KEEP_BASE.set(True)
    try:
        yield
    finally:
        _KEEP_BASE.reset(token)


def _record(weight: torch.Tensor) -> None:
    journal = _JOURNAL.get()
    if journal is not None:
        old = weight.data
        journal.append((weight, old if old.device.type == "cpu" else old.to("cpu", copy=True)))


# ---- which layers ---------------------------------------------------------------------------
def _refusal(layer: nn.Module, init: str, r: int, name: str) -> Optional[Exception]:
    """Why `init` cannot start an adapter of rank `r` on `layer` (a base layer or a LoRA layer), or None."""
    kind = init_kind(init)
    get_base = getattr(layer, "get_base_layer", None)
    base = cast(nn.Module, get_base()) if callable(get_base) else layer
    if kind is None or (isinstance(base, nn.Embedding) and kind != "loftq"):
        return None  # an Embedding gets its default start, as in HF PEFT
    if isinstance(base, nn.Embedding) or isinstance(base, nn.Conv2d):
        what = "OLoRA" if kind == "olora" else kind.capitalize() if kind == "loftq" else "PiSSA"
        error = TypeError if kind == "loftq" else ValueError  # HF PEFT's types (its LoftQ fails with a TypeError)
        return error(
            f"init_lora_weights={init!r} ({what}) applies to Linear and Conv1D layers only, but {name} is a "
            f"{type(base).__name__}; leave it out of target_modules or use init_lora_weights=True"
        )
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    if _quantized(base) or not weight.dtype.is_floating_point:
        return TypeError(
            f"init_lora_weights={init!r} needs a float base weight, but {name} holds {weight.dtype} "
            f"({type(base).__name__}). Initialise on the float model (float32, float16 or bfloat16), then quantise "
            "the residual model"
        )
    if r > min(weight.shape[:2]):
        return ValueError(
            f"init_lora_weights={init!r} takes the adapter from the first r singular vectors / QR columns of the "
            f"base weight, but r={r} is larger than {name} allows ({tuple(weight.shape)}: rank at most "
            f"{min(weight.shape[:2])}); use r <= {min(weight.shape[:2])} (or rank_pattern for this layer)"
        )
    return None


def _quantized(module: nn.Module) -> bool:
    """A bitsandbytes 8-bit or 4-bit layer (by class name: bitsandbytes is not imported for it)."""
    return is_linear8bit(module) or any(
        c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__
    )


def check_init_targets(tuner: Any, config: Any) -> None:
    """Refuse an initialisation that cannot start on one of the targeted layers, before any layer (or base weight:
    these initialisations change it) is touched."""
    if init_kind(config.init_lora_weights) is None:
        return
    from ..base import pattern_value

    for key in tuner.matching_keys(config):
        r = pattern_value(config.rank_pattern, key, config.r)
        error = _refusal(tuner.model.get_submodule(key), config.init_lora_weights, r, key)
        if error is not None:
            raise error


# ---- the initialisations ------------------------------------------------------------------------
def _oriented(layer: LoraLayer, weight: torch.Tensor) -> torch.Tensor:
    """The weight as (out, in): Conv1D stores (in, out)."""
    return weight.T if getattr(layer, "fan_in_fan_out", False) else weight


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32  # HF PEFT computes in float32


@torch.no_grad()
def init_from_base(layer: LoraLayer, adapter_name: str, init: str) -> None:
    """Start `adapter_name` of a Linear / Conv1D LoRA layer with `init` and write the base weight it leaves. The
    factors stay in the computation's precision (the layer casts them to the adapter dtype after)."""
    error = _refusal(cast(nn.Module, layer), init, layer.r[adapter_name], type(layer).__name__)
    if error is not None:
        raise error
    base = layer.get_base_layer()
    weight = cast(torch.Tensor, base.weight)
    dtype = weight.dtype
    W = _oriented(layer, weight.data).to(_work_dtype(dtype))
    r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    kind = init_kind(init)
    if kind == "loftq":
        residual, A, B = _loftq(W, r, getattr(init, "loftq_bits", 4), getattr(init, "loftq_iter", 1))
    else:
        A, B = _pissa(W, r, scaling, init) if kind == "pissa" else _olora(W, r)
        residual = W - (scaling * B) @ A
    cast(torch.Tensor, layer.lora_A[adapter_name].weight).data = A.contiguous()
    cast(torch.Tensor, layer.lora_B[adapter_name].weight).data = B.contiguous()
    _record(weight)
    weight.data = _oriented(layer, residual.to(dtype)).contiguous()


def _pissa(W: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s) for W = U S V^T (the principal part, divided by the
    scaling so that s B A is it)."""
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(W, r, niter=int(init[len(_NITER) :]))
        Vh = V.t()
    root = torch.sqrt(S / scaling)
    return Vh * root[:, None], U * root[None, :]


def _olora(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = R_r (first r rows), B = Q_r (first r columns) of W = Q R."""
    Q, R = torch.linalg.qr(W)
    return R[:r], Q[:, :r]


def _low_rank(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with L R the best rank-r approximation of M, sqrt(S) on each side."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = torch.sqrt(S[:r])
    return U[:, :r] * root[None, :], Vh[:r] * root[:, None]


def _loftq(W: torch.Tensor, r: int, bits: int, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF PEFT's LoftQ: alternately quantise W - L R and fit L R to W - Q(...). Returns (the dequantised base, A, B);
    B A approximates the quantisation error unscaled (HF PEFT ignores lora_alpha / r here)."""
    target = W.float()
    remainder = target.clone()
    for i in range(iters):
        dequantised = nf4_roundtrip(remainder) if bits == 4 else int8_roundtrip(remainder)
        L, R = _low_rank(target - dequantised, r)
        if i + 1 == iters:
            break
        remainder = target - L @ R
    return dequantised, R, L


# NF4's 16 levels (bitsandbytes' `get_4bit_type("nf4")`, the normal-float code of QLoRA)
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def nf4_roundtrip(weight: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """`weight` quantised to NF4 and back, as bitsandbytes' `quantize_4bit` / `dequantize_4bit` (blocks of 64
    consecutive elements, fp32 absmax per block, the nearest level), in plain torch: no bitsandbytes needed, and
    right for every shape (bitsandbytes 0.50's CPU kernel mis-quantises tensors whose size is not a multiple of the
    block size)."""
    flat = weight.float().reshape(-1)
    pad = (-flat.numel()) % blocksize
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scaled = blocks / torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=weight.device)
    # the nearest level: the levels are sorted, so count the midpoints below each value
    index = torch.bucketize(scaled, (levels[1:] + levels[:-1]) / 2)
    return (levels[index] * absmax).reshape(-1)[: flat.numel()].view(weight.shape)


def int8_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """`weight` quantised to int8 per row (absmax / 127) and back, as bitsandbytes' `int8_vectorwise_quant` /
    `int8_vectorwise_dequant`."""
    w = weight.float()
    absmax = w.abs().amax(dim=1, keepdim=True)
    codes = torch.round(w * (127.0 / absmax)).clamp_(-127, 127)
    codes = torch.where(absmax == 0, torch.zeros_like(codes), codes)
    return codes * absmax * 7.874015718698502e-3  # bitsandbytes multiplies by 1/127 rounded to float32


# ---- saving relative to the original base -------------------------------------------------------------
CONVERTIBLE = ("pissa", "olora", "true")  # HF PEFT's prefixes of init_lora_weights (and corda, lora_ga)


def check_conversion(model: Any, adapter_names: list[str], initial: Any) -> None:
    """`save_pretrained(path_initial_model_for_weight_conversion=...)`'s checks, before anything is written."""
    if not isinstance(initial, (str, os.PathLike)):
        raise TypeError(
            f"path_initial_model_for_weight_conversion must be the folder of the adapter saved right after "
            f"creation, got {short_repr(initial)}"
        )
    if not os.path.isdir(initial):
        raise ValueError(
            f"path_initial_model_for_weight_conversion={os.fspath(initial)!r} is not a folder; save the adapter "
            "right after creating it (before training) and give that folder"
        )
    changed_base = sorted(n for n, c in model.peft_config.items() if init_kind(c.init_lora_weights) is not None)
    if len(changed_base) > 1:  # each conversion assumes the original base minus its own start only
        raise ValueError(
            f"path_initial_model_for_weight_conversion cannot convert here: adapters {changed_base} each replaced the "
            "base weights at creation (PiSSA / OLoRA / LoftQ), so the base under either is not the original minus "
            "its own start and the converted adapter would compute something else; convert each from a model that "
            "holds only that adapter"
        )
    for name in adapter_names:
        config = model.peft_config[name]  # a LoraConfig: a LoRA model holds no other (other tuners refuse in BaseTuner)
        if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
            raise ValueError(
                "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported when "
                "using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`."
            )
        if not any(str(config.init_lora_weights).lower().startswith(p) for p in CONVERTIBLE):
            warnings.warn(
                "`path_initial_model_for_weight_conversion` only works for converting a PiSSA/CorDA/OLoRA/LoRA-GA "
                "adapter to a LoRA adapter",
                stacklevel=4,  # the caller of save_pretrained (via LoraModel.check_weight_conversion)
            )


def converted_to_lora(
    tensors: dict[str, torch.Tensor], config: Any, initial: str | os.PathLike, allow_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], Any]:
    """(the tensors, the config) of a plain rank-2r LoRA adapter for the ORIGINAL base equal to the trained adapter
    `tensors` over the residual base: `[A | A0]`, `[B | -B0]`, scaling kept (r and lora_alpha doubled; with rsLoRA
    lora_alpha * sqrt(2)). `initial`: the folder of the same adapter saved right after creation; only its tensors
    are read (HF PEFT also rewrites its adapter_config.json: here the folder is left as it is)."""
    from ...serialization import check_adapter_tensors, load_peft_weights

    start = load_peft_weights(os.fspath(initial), device="cpu", allow_pickle=allow_pickle)
    factors = [k for k in tensors if _factor_side(k) is not None]
    # the adapter written would hold them, and loading refuses it
    check_adapter_tensors(
        {k: start[k] for k in factors if k in start},
        what=f"the initial adapter's tensors in {os.fspath(initial)!r}",
        opt_in="give the folder of this adapter saved right after creation",
    )
    missing = sorted(k for k in factors if k not in start)
    if missing or not factors:
        raise ValueError(
            f"the initial adapter in {os.fspath(initial)!r} does not hold this adapter's LoRA tensors "
            f"(missing: {missing[:3] or 'every lora_A / lora_B'}); give the folder of this adapter saved right "
            "after creation"
        )
    out = dict(tensors)
    for key in factors:
        if start[key].shape != tensors[key].shape:
            raise ValueError(
                f"the initial adapter in {os.fspath(initial)!r} holds {key} of shape {tuple(start[key].shape)}, "
                f"but this adapter's is {tuple(tensors[key].shape)}; give the folder of this adapter saved right "
                "after creation"
            )
        first = start[key].to(tensors[key].dtype)
        if _factor_side(key) == "A":
            out[key] = torch.cat([tensors[key], first], dim=0).contiguous()
        else:
            out[key] = torch.cat([tensors[key], -first], dim=1).contiguous()
    saved = copy.deepcopy(config)
    saved.init_lora_weights = True
    saved.r = config.r * 2
    saved.lora_alpha = config.lora_alpha * (2**0.5 if config.use_rslora else 2)
    saved.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    saved.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    return out, saved


def _factor_side(key: str) -> Optional[str]:
    """ "A" / "B" for a LoRA factor's saved key (Linear / Conv2d weights and embedding factors), else None."""
    if key.endswith(".lora_A.weight") or key.endswith(".lora_embedding_A"):
        return "A"
    if key.endswith(".lora_B.weight") or key.endswith(".lora_embedding_B"):
        return "B"
    return None
