"""IA3's default targets by transformers `config.model_type` (HF PEFT's
`TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING` / `..._FEEDFORWARD_MODULES_MAPPING`, re-exported under those
names by `lightning_peft.utils.constants`): used when `target_modules` / `feedforward_modules` are None.

Imports nothing, so `utils.constants` can read it without importing the tuner.
"""

from __future__ import annotations

# IA3 scales keys, values and the feed-forward output (whose input it scales: those are the feedforward modules)
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
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

DEFAULT_FEEDFORWARD_MODULES: dict[str, list[str]] = {
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
