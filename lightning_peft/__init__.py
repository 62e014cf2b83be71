"""Parameter-efficient fine-tuning for PyTorch Lightning, compatible with HF PEFT's API and adapter files.

`import lightning_peft as peft` works in code written for HF PEFT where the names overlap.
"""

__version__ = "0.1.0"  # first: configs made while the package loads read it (peft_version)

from .auto import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .base_state_dict import get_base_model_state_dict, set_base_model_state_dict
from .config import PeftConfig, PeftType, TaskType
from .mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, get_peft_config, inject_adapter_in_model
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_layer_status,
    get_model_status,
    get_peft_model,
)
from .serialization import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from .tuners.ia3 import IA3Config, IA3Model
from .tuners.lora import LoftQConfig, LoraConfig, LoraModel, LoraRuntimeConfig
from .tuners.p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from .tuners.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from .tuners.prompt_learning import PromptLearningConfig
from .tuners.prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit
from .tuners.trainable_tokens import TrainableTokensConfig, TrainableTokensModel
from .utils import (
    TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING,
    NoMatchingPeftModuleError,
    PeftError,
    PeftWarning,
    cast_mixed_precision_params,
    prepare_model_for_kbit_training,
    shift_tokens_right,
)

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING",
    "NoMatchingPeftModuleError",
    "PeftError",
    "PeftWarning",
    "PromptLearningConfig",
    "get_layer_status",
    "get_model_status",
    "get_peft_config",
    "inject_adapter_in_model",
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
    "cast_mixed_precision_params",
    "prepare_model_for_kbit_training",
    "shift_tokens_right",
    "get_base_model_state_dict",
    "set_base_model_state_dict",
    "LoraConfig",
    "LoraModel",
    "LoraRuntimeConfig",
    "LoftQConfig",
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
    "TrainableTokensConfig",
    "TrainableTokensModel",
]
