"""Names and default targets as HF PEFT 0.21 has them in `peft.utils.constants` / `peft.utils` (tested equal to
HF PEFT's tables in tests/test_hf_public_names.py).

The `*_TARGET_MODULES_MAPPING` tables give, by transformers `config.model_type`, the modules a tuner adapts when its
config leaves `target_modules` (and, for IA3, `feedforward_modules`) unset, so `LoraConfig(task_type="CAUSAL_LM")`
works on Llama, GPT-2, T5, BERT, ... without naming targets. A list names modules (matched as a suffix of the full
module name), a string is a regex matched against the whole name.
"""

from __future__ import annotations

from typing import Union

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"  # HF PEFT's name for the pickled file (lightning_peft reads it on request only)
INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"
EMBEDDING_LAYER_NAMES = ["embed_tokens", "lm_head"]
SEQ_CLS_HEAD_NAMES = ["score", "classifier"]


TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: dict[str, Union[list[str], str]] = {
    # encoder-decoder
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    # encoders
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "layoutlm": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    # decoders with a fused query-key-value projection
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "bloom": ["query_key_value"],
    "gpt_neox": ["query_key_value"],
    "chatglm": ["query_key_value"],
    "falcon": ["query_key_value"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "mpt": ["Wqkv"],
    "codegen": ["qkv_proj"],
    "btlm": ["c_proj", "c_attn"],
    # decoders with separate projections
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",  # the multimodal model: its language model only
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    # recurrent
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}

# IA3 scales keys, values and the feed-forward output (whose input it scales: those are the feedforward modules)
TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "bert": ["key", "value", "output.dense"],
    "roberta": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}

TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "bart": ["fc2"],
    "bert": ["output.dense"],
    "roberta": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "gpt2": ["mlp.c_proj"],
    "gpt_bigcode": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "gpt_neox": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "RefinedWeb": ["dense_4h_to_h"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neo": ["c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}

# HF PEFT 0.21's table of past-key-value post-processing for prefix tuning is empty (transformers' caches need none);
# kept, empty, for code that imports it
TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING: dict[str, object] = {}


def model_type_of(model: object) -> str | None:
    """transformers' `config.model_type` of `model` (None for a model without a transformers config)."""
    config = getattr(model, "config", None)
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return model_type if isinstance(model_type, str) else None
