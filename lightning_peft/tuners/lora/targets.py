"""LoRA's default targets by transformers `config.model_type`: the modules `LoraConfig(target_modules=None)` adapts
(HF PEFT's `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`, re-exported under that name by
`lightning_peft.utils.constants`). A list names modules (matched as a suffix of the full module name), a string is a
regex matched against the whole name.

Imports nothing, so `utils.constants` can read it without importing the tuner.
"""

from __future__ import annotations

from typing import Union

DEFAULT_TARGET_MODULES: dict[str, Union[list[str], str]] = {
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
