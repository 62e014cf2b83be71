"""`LoraConfig`: HF PEFT 0.21's LoRA settings, read and written as its adapter_config.json.

Every HF field is present so HF's files and code read; the features lightning_peft does not implement
(`NOT_IMPLEMENTED`, HF-only initialisations) are accepted only at their neutral value and refused otherwise, so an
adapter never computes something else than it was trained for.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from ...config import (
    RUNTIME,
    SAVED_PREFIX,
    PeftConfig,
    PeftType,
    allow_in_weights_only_loads,
    check_exclude_modules,
    check_finite,
    check_regex,
    check_target_modules,
    files_missing,
    plain_subconfig,
    refuse_not_implemented,
    short_repr,
    size_mismatch,
    validate_choice,
)
from .init import check_init
from .replication import check_layer_map

# No layer has use for a rank this large (HF PEFT allows r above min(in, out), but not in the millions): a
# config claiming one is refused before anything is allocated at that size.
MAX_RANK = 2**20


def _check_rank(where: str, value: object, what: str = "a positive integer (the LoRA rank)") -> None:
    if isinstance(value, bool) or not isinstance(value, int):  # a wrong type is a TypeError, as in HF PEFT
        raise TypeError(f"{where} must be {what}, got {short_repr(value)}")
    if value <= 0:
        raise ValueError(f"{where} must be {what}, got {short_repr(value)}")
    if value > MAX_RANK:
        raise ValueError(
            f"{where}={value} is above {MAX_RANK} (2**20); no layer has use for such a rank and building it would "
            "exhaust memory. Use a rank of at most the layer's width"
        )


# HF PEFT 0.21's LoraConfig fields whose feature lightning_peft does not implement: kept at their neutral value
# (so HF's adapter_config.json and code naming them work), refused at any other
NOT_IMPLEMENTED = {
    "megatron_config": "LoRA on Megatron parallel layers",
    "velora_config": "VeLoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA",
    "monteclora_config": "MonteCLoRA",
    "lora_bias": "a bias on lora_B",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "ensure_weight_tying": "adapters tied like the weights they adapt",
}
# of those, the ones HF PEFT switches on whenever they are not None (a sub-config `{}` means its defaults)
NONE_ONLY = (
    "velora_config",
    "alora_invocation_tokens",
    "monteclora_config",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
)
# init_lora_weights values of HF PEFT that lightning_peft does not implement (data-driven and other starts)
HF_ONLY_INITS = ("eva", "corda", "orthogonal", "lora_ga", "mica")
INITS_HERE = "'pissa', 'pissa_niter_K', 'olora' or 'loftq' (with loftq_config)"
# sub-configs of HF initialisations: only read with their `init_lora_weights`, so here they never have an effect
INIT_SUBCONFIGS = {"eva_config": "eva", "corda_config": "corda", "lora_ga_config": "lora_ga"}


@allow_in_weights_only_loads
@dataclass
class LoraRuntimeConfig:
    """HF PEFT's runtime settings of a LoRA config (never saved). `ephemeral_gpu_offload` only speeds up HF PEFT's
    set-up of DoRA / LoftQ on a CPU-offloaded model; it is kept and has no effect here."""

    ephemeral_gpu_offload: bool = False


@dataclass
class LoraConfig(PeftConfig):
    """Low-rank adaptation: output = base(x) + B(A(dropout(x))) * lora_alpha / r (rsLoRA: / sqrt(r)).

    Every field of HF PEFT 0.21's LoraConfig is here; those in `NOT_IMPLEMENTED` must keep their neutral value."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.LORA
    # LoRA keys refused (at a non-neutral value) also in another tuner's config file (PeftConfig.from_dict):
    # {key: whether it is an on/off flag}
    MATH_CHANGING_FILE_KEYS: ClassVar[dict[str, bool]] = {
        **dict.fromkeys(
            (
                "alora_invocation_tokens",
                "corda_config",
                "arrow_config",
                "use_bdlora",
            ),
            False,
        ),
        **dict.fromkeys(("use_dora", "use_rslora", "lora_bias", "use_qalora", "ensure_weight_tying"), True),
    }

    r: int = 8
    target_modules: Optional[Union[list[str], set[str], str]] = None  # a list becomes a set
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    # HF PEFT's other fields: kept (and saved) as given, without effect here (loftq_config: read by
    # init_lora_weights='loftq')
    megatron_core: Optional[str] = "megatron.core"
    qalora_group_size: int = 16
    loftq_config: dict = field(default_factory=dict)
    eva_config: Optional[dict] = None
    corda_config: Optional[dict] = None
    lora_ga_config: Optional[dict] = None
    runtime_config: LoraRuntimeConfig = field(default_factory=LoraRuntimeConfig, metadata=RUNTIME)
    # implemented here
    exclude_modules: Optional[Union[list[str], set[str], str]] = None  # a list becomes a set
    layer_replication: Optional[list[list[int]]] = None  # [start, end) ranges of layers (replication.py)
    # HF PEFT's variant fields: use_rslora, trainable_token_indices (trainable_tokens.py), use_dora
    # (dora.py) and target_parameters (param_wrapper.py) work; the others keep their neutral value (NOT_IMPLEMENTED)
    use_rslora: bool = False
    megatron_config: Optional[dict] = None
    trainable_token_indices: Optional[Union[list[int], dict]] = None
    use_dora: bool = False
    velora_config: Optional[dict] = None
    alora_invocation_tokens: Optional[list[int]] = None
    use_qalora: bool = False
    monteclora_config: Optional[dict] = None
    lora_bias: bool = False
    target_parameters: Optional[list[str]] = None
    use_bdlora: Optional[dict] = None
    arrow_config: Optional[dict] = None
    kasa_config: Optional[dict] = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_hf_fields()
        _check_rank("r", self.r)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise TypeError(f"lora_alpha must be a number, got {short_repr(self.lora_alpha)}")
        check_finite("lora_alpha", self.lora_alpha)
        check_finite("lora_dropout", self.lora_dropout)
        dropout = self.lora_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):  # TypeError, as in HF PEFT
            raise TypeError(f"lora_dropout must be a number in [0, 1), got {short_repr(dropout)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {short_repr(dropout)}")
        if not isinstance(self.fan_in_fan_out, bool):
            raise TypeError(f"fan_in_fan_out must be True or False, got {short_repr(self.fan_in_fan_out)}")
        validate_choice("bias", self.bias, ("none", "all", "lora_only"))
        self._check_init()
        for flag in ("use_rslora", "use_dora"):  # 0 / 1 as HF PEFT's truth test reads them; anything else is a mistake
            value = getattr(self, flag)
            if type(value) is int and value in (0, 1):
                setattr(self, flag, bool(value))
            elif not isinstance(value, bool):
                raise TypeError(f"{flag} must be True or False, got {short_repr(value)}")
        check_target_modules(self, empty_ok=bool(self.target_parameters))  # parameters only: HF's target_modules=[]
        check_exclude_modules(self)
        self.layer_replication = check_layer_map(self.layer_replication)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "layers_to_transform cannot be used when target_modules is a regex string; "
                "give target_modules as a list"
            )
        layers_pattern = self.layers_pattern
        if layers_pattern is not None and not (
            (isinstance(layers_pattern, str) and 0 < len(layers_pattern) <= 200)
            or (
                isinstance(layers_pattern, (list, tuple))
                and all(isinstance(p, str) and 0 < len(p) <= 200 for p in layers_pattern)
            )
        ):
            raise TypeError(
                "layers_pattern must be the name (or a list of names, each up to 200 characters) of the module list "
                f"holding the layers, e.g. 'layers'; got {short_repr(layers_pattern)}"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only has an effect together with layers_to_transform; set both")
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            if not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0
                for i in ([layers] if isinstance(layers, int) else layers)
            ):
                raise TypeError(
                    f"layers_to_transform must be a layer index or a list of them, got {short_repr(layers)}"
                )
            if not isinstance(layers, int):
                self.layers_to_transform = list(layers)
        for name, patterns, positive_int in (
            ("rank_pattern", self.rank_pattern, True),
            ("alpha_pattern", self.alpha_pattern, False),
        ):
            if not isinstance(patterns, dict):
                raise TypeError(f"{name} must be a dict {{module-name pattern: value}}, got {short_repr(patterns)}")
            for key, value in patterns.items():
                if not isinstance(key, str) or not key:
                    raise TypeError(f"{name} keys must be module-name regexes, got {short_repr(key)}")
                check_regex(name, key, is_key=True)
                where = f"{name}[{short_repr(key, 60)}]"
                if positive_int:
                    _check_rank(where, value, "a positive integer rank")
                if not positive_int and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise TypeError(f"{where} must be a number, got {short_repr(value)}")
                check_finite(where, value)
            setattr(self, name, dict(patterns))

    def _check_init(self) -> None:
        init = self.init_lora_weights
        if init is True or init is False or str(init).lower() == "gaussian" or check_init(self):
            return
        if isinstance(init, str) and init in HF_ONLY_INITS:
            raise ValueError(
                f"init_lora_weights={init!r} is an HF PEFT initialisation lightning_peft does not implement (yet); "
                f"use True (lora_B zero), False (random, for tests), 'gaussian', {INITS_HERE}"
            )
        raise ValueError(
            f"init_lora_weights={short_repr(init)} is not valid; use True (lora_B zero), False (random), 'gaussian', "
            + INITS_HERE
        )

    def _check_hf_fields(self) -> None:
        """HF PEFT's fields this class keeps for compatibility: their types, HF's warnings, and the refusal of the
        features not implemented here (`NOT_IMPLEMENTED`)."""
        targets = self.target_parameters
        if targets is not None:  # a list of names (HF PEFT: a string is a TypeError)
            if not isinstance(targets, (list, tuple, set)) or not all(isinstance(t, str) and t for t in targets):
                raise TypeError(f"target_parameters must be a list of parameter names or None, got {targets!r}")
            self.target_parameters = list(dict.fromkeys(targets))
        from .trainable_tokens import check_field

        self.trainable_token_indices = check_field(self.trainable_token_indices)
        refuse_not_implemented(self, NOT_IMPLEMENTED, NONE_ONLY)
        if self.megatron_core is not None and not isinstance(self.megatron_core, str):
            raise TypeError(f"megatron_core must be a module name (str), got {short_repr(self.megatron_core)}")
        if isinstance(self.qalora_group_size, bool) or not isinstance(self.qalora_group_size, int):
            raise TypeError(f"qalora_group_size must be an integer, got {short_repr(self.qalora_group_size)}")
        for name, init in INIT_SUBCONFIGS.items():
            value = plain_subconfig(name, getattr(self, name))
            setattr(self, name, value)
            if value is not None:  # HF PEFT warns alike (its init_lora_weights would use it; none here can)
                warnings.warn(f"{name} is set but ignored: only init_lora_weights={init!r} uses it", stacklevel=4)
        loftq = plain_subconfig("loftq_config", self.loftq_config)
        if loftq and self.init_lora_weights != "loftq":  # HF PEFT drops it with the same warning
            warnings.warn("loftq_config is set but ignored: only init_lora_weights='loftq' uses it", stacklevel=4)
        self.loftq_config = loftq if self.init_lora_weights == "loftq" else {}
        runtime: Any = self.runtime_config
        if isinstance(runtime, dict):
            runtime = LoraRuntimeConfig(**runtime)
        elif not isinstance(runtime, LoraRuntimeConfig) and dataclasses.is_dataclass(runtime):
            runtime = LoraRuntimeConfig(ephemeral_gpu_offload=getattr(runtime, "ephemeral_gpu_offload", False))
        if not isinstance(runtime, LoraRuntimeConfig) or not isinstance(runtime.ephemeral_gpu_offload, bool):
            raise TypeError(f"runtime_config must be a LoraRuntimeConfig (or a dict of it), got {short_repr(runtime)}")
        self.runtime_config = runtime

    def check_fits_weights(self, shapes: dict[str, tuple[int, ...]], weights_file: str) -> None:
        """Every saved `lora_A` has the rank this config gives its module (`r` or a `rank_pattern` entry), and no
        rank the config claims is larger than every saved one: the adapter is built at the config's ranks before
        the file is read, so a huge `r` in a small folder is refused here instead of being allocated; a file without
        any `lora_A` is refused (it cannot be this adapter's, and it backs no rank)."""
        from ..base import pattern_value

        file_ranks = {}
        for key, shape in shapes.items():
            module, sep, tail = key.removeprefix(SAVED_PREFIX + "model.").rpartition(".lora_")
            if sep and tail in ("A.weight", "embedding_A") and shape:
                file_ranks[key] = (module, shape)
        if not file_ranks:  # no tensor backs any rank: the config's ranks would be allocated as it claims
            raise ValueError(files_missing(weights_file, "lora_A tensor (lora_A.weight / lora_embedding_A)", shapes))
        for key, (module, shape) in file_ranks.items():
            pattern = next((p for p in self.rank_pattern if pattern_value({p: True}, module, False)), None)
            field_name, rank = (
                ("r", self.r) if pattern is None else (f"rank_pattern[{pattern!r}]", self.rank_pattern[pattern])
            )
            # an adapter on a 3-D parameter (target_parameters) has r rows per expert; the load checks the exact shape
            if shape[0] != rank and not (self.target_parameters and shape[0] % rank == 0):
                raise ValueError(size_mismatch(field_name, rank, weights_file, key, shape, f"rank {shape[0]}"))
        largest = max(shape[0] for _, shape in file_ranks.values())
        for field_name, value in (("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())):
            if value > largest:
                key, (_, shape) = next(iter(file_ranks.items()))
                raise ValueError(
                    size_mismatch(field_name, value, weights_file, key, shape, f"no saved rank is above {largest}")
                )
