"""Parameter-efficient fine-tuning for PyTorch Lightning, compatible with HF PEFT's API and adapter files.

`import lightning_peft as peft` works in code written for HF PEFT where the names overlap.
"""

from .config import PeftConfig, PeftType, TaskType
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from .serialization import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from .tuners.ia3 import IA3Config, IA3Model
from .tuners.lora import LoraConfig, LoraModel
from .tuners.p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from .tuners.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from .tuners.prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit

__version__ = "0.1.0"

__all__ = [
    "PeftConfig",
    "PeftType",
    "TaskType",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "get_peft_model",
    "get_peft_model_state_dict",
    "load_peft_weights",
    "set_peft_model_state_dict",
    "LoraConfig",
    "LoraModel",
    "IA3Config",
    "IA3Model",
    "PromptTuningConfig",
    "PromptTuningInit",
    "PromptEmbedding",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptEncoder",
    "PrefixTuningConfig",
    "PrefixEncoder",
]
