"""HF PEFT's `AutoPeftModel*` classes, its module paths (`peft.utils.other`, `peft.tuners.lora`, ...) and small helpers
(`shift_tokens_right`, `cast_mixed_precision_params`, `LoraRuntimeConfig`), against the installed HF `peft` 0.21:
the same folders loaded by both (bases saved here, offline), outputs, types and exception types compared."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import json

import peft
import peft.utils.other
import pytest
import torch
import transformers
from helpers import VOCAB, ids, logits, perturb, quiet, tiny_bert_classifier, tiny_gpt2, tiny_t5

import lightning_peft as lp
import lightning_peft.utils as lpu

AUTO_NAMES = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForFeatureExtraction",
]


def _saved_base(model, folder):
    """`model` saved and read back with its Auto class, so its name_or_path is `folder` (what adapters record)."""
    model.save_pretrained(folder)
    return type(model).from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Bases saved to disk and adapters naming them: GPT-2 (written by HF peft), T5 (written by us), BERT classifier
    (ours, with its head saved), BertModel without a task type (HF peft: auto_mapping)."""
    root = tmp_path_factory.mktemp("auto")
    out = {}
    base = _saved_base(tiny_gpt2(), root / "gpt2")
    model = peft.get_peft_model(
        base, peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    perturb(model)
    model.save_pretrained(root / "gpt2-lora")
    out["gpt2"] = root / "gpt2-lora"

    base = _saved_base(tiny_t5(), root / "t5")
    model = lp.get_peft_model(base, lp.LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, target_modules=["q", "v"]))
    perturb(model)
    model.save_pretrained(root / "t5-lora")
    out["t5"] = root / "t5-lora"

    base = _saved_base(tiny_bert_classifier(), root / "bert-cls")
    model = lp.get_peft_model(base, lp.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    perturb(model)
    model.save_pretrained(root / "bert-cls-lora")
    out["bert_cls"] = root / "bert-cls-lora"

    base = _saved_base(tiny_bert_classifier().bert, root / "bert")
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["query"]))
    perturb(model)
    model.save_pretrained(root / "bert-lora")
    out["bert_none"] = root / "bert-lora"
    return out


def _both(name, folder, **kwargs):
    return quiet(getattr(peft, name).from_pretrained, str(folder), **kwargs), quiet(
        getattr(lp, name).from_pretrained, str(folder), **kwargs
    )


def _trainable(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "auto, key, wrapper, base_type, inputs",
    [
        ("AutoPeftModelForCausalLM", "gpt2", "PeftModelForCausalLM", "GPT2LMHeadModel", None),
        ("AutoPeftModelForSeq2SeqLM", "t5", "PeftModelForSeq2SeqLM", "T5ForConditionalGeneration", "t5"),
        ("AutoPeftModelForSequenceClassification", "bert_cls", "PeftModelForSequenceClassification", None, None),
        ("AutoPeftModel", "bert_none", "PeftModel", "BertModel", "hidden"),
    ],
)
def test_auto_classes_load_as_hf_peft(folders, auto, key, wrapper, base_type, inputs):
    """The same base class, wrapper class, frozen inference-mode model and outputs as HF PEFT's, from folders written
    by either library; is_trainable=True leaves the same parameters trainable."""
    theirs, ours = _both(auto, folders[key])
    assert type(ours) is getattr(lp, wrapper) and type(theirs) is getattr(peft, wrapper)
    assert type(ours.get_base_model()) is type(theirs.get_base_model())
    if base_type is not None:
        assert type(ours.get_base_model()).__name__ == base_type
    assert not ours.training and not any(_trainable(ours).values())
    x = ids()
    with torch.no_grad():
        if inputs == "t5":
            want = theirs(input_ids=x, decoder_input_ids=x[:, :4]).logits
            got = ours(input_ids=x, decoder_input_ids=x[:, :4]).logits
        elif inputs == "hidden":
            want, got = theirs(input_ids=x).last_hidden_state, ours(input_ids=x).last_hidden_state
        else:
            want, got = logits(theirs, x), logits(ours, x)
    torch.testing.assert_close(got, want)
    theirs, ours = _both(auto, folders[key], is_trainable=True, adapter_name="other")
    assert _trainable(ours) == _trainable(theirs) and any(_trainable(ours).values())
    assert ours.active_adapters == theirs.active_adapters == ["other"]


def test_base_kwargs_go_to_the_base_and_peft_kwargs_to_peft(folders):
    """`dtype=` reaches transformers (the base in bfloat16, the LoRA weights float32 by autocast, as HF's);
    `ignore_base_model_mismatch=` / `allow_pickle=` reach PeftModel.from_pretrained, not transformers."""
    theirs, ours = _both("AutoPeftModelForCausalLM", folders["gpt2"], dtype=torch.bfloat16)
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in theirs.named_parameters()}
    assert ours.get_base_model().transformer.wte.weight.dtype == torch.bfloat16
    ours = lp.AutoPeftModelForCausalLM.from_pretrained(
        folders["gpt2"], ignore_base_model_mismatch=True, allow_pickle=False, subfolder=None
    )
    assert type(ours) is lp.PeftModelForCausalLM


def _edited_copy(src, dst, **changes):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    data = json.loads((dst / "adapter_config.json").read_text())
    data.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(data))
    return dst


@pytest.fixture
def base_loads(monkeypatch):
    """Counts calls of every transformers from_pretrained the Auto classes could use (a refusal must load nothing)."""
    calls = []
    for name in ("AutoModel", "AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "BertModel", "AutoTokenizer"):
        cls = getattr(transformers, name)
        original = cls.from_pretrained.__func__

        def counting(klass, *args, _original=original, **kwargs):
            calls.append(klass.__name__)
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(counting))
    return calls


@pytest.mark.parametrize(
    "auto, key, changes, match",
    [
        ("AutoPeftModelForSeq2SeqLM", "gpt2", {}, "Expected target PEFT class: PeftModelForCausalLM"),
        ("AutoPeftModelForCausalLM", "t5", {}, "Expected target PEFT class: PeftModelForSeq2SeqLM"),
        ("AutoPeftModelForFeatureExtraction", "bert_cls", {}, "PeftModelForSequenceClassification"),
        ("AutoPeftModel", "gpt2", {}, "Cannot use `AutoPeftModel` with a task type"),
        ("AutoPeftModelForCausalLM", "bert_none", {"auto_mapping": None}, "Cannot infer the auto class"),
        ("AutoPeftModel", "bert_none", {"auto_mapping": {"base_model_class": "path", "parent_library": "os"}}, "'os'"),
    ],
)
def test_refusals_are_hf_peft_s_and_load_nothing(folders, tmp_path, base_loads, auto, key, changes, match):
    folder = _edited_copy(folders[key], tmp_path / "adapter", **changes) if changes else folders[key]
    for lib in (peft, lp):
        with pytest.raises(ValueError, match=match):
            getattr(lib, auto).from_pretrained(str(folder))
    assert base_loads == []  # every check happens before a model is loaded


def test_our_own_refusals(folders, tmp_path, base_loads):
    """trust_remote_code=True (no code from files runs here; HF peft passes it on), an auto_mapping naming something
    that is not a model class, a bad adapter name: refused before anything is loaded. Direct construction: OSError,
    as HF's."""
    with pytest.raises(ValueError, match="trust_remote_code is refused"):
        lp.AutoPeftModelForCausalLM.from_pretrained(folders["gpt2"], trust_remote_code=True)
    folder = _edited_copy(
        folders["bert_none"],
        tmp_path / "a",
        auto_mapping={"base_model_class": "logging", "parent_library": "transformers"},
    )
    with pytest.raises(ValueError, match="not a model class"):
        lp.AutoPeftModel.from_pretrained(folder)
    with pytest.raises(ValueError, match="auto_mapping must be"):
        lp.AutoPeftModel.from_pretrained(_edited_copy(folders["bert_none"], tmp_path / "b", auto_mapping={"x": 1}))
    with pytest.raises(ValueError, match="adapter name"):
        lp.AutoPeftModelForCausalLM.from_pretrained(folders["gpt2"], adapter_name="a/b")
    with pytest.raises(TypeError, match="import_allowlist"):
        lp.AutoPeftModel.from_pretrained(folders["bert_none"], import_allowlist="transformers")
    assert base_loads == []
    for lib in (peft, lp):
        with pytest.raises(OSError, match="from_pretrained"):
            lib.AutoPeftModelForCausalLM()
    assert lp.auto.get_default_import_allowlist() == peft.auto.get_default_import_allowlist()


def test_no_code_from_the_base_folder_runs(folders, tmp_path):
    """A base folder whose config.json points the Auto class at a .py file in it: the file is never imported (the
    Auto class is told trust_remote_code=False, so transformers' own GPT-2 class loads the weights)."""
    base = tmp_path / "base"
    base.mkdir()
    gpt2 = folders["gpt2"].parent / "gpt2"
    for f in gpt2.iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "ran"
    (base / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (base / "config.json").write_text(json.dumps(config))
    folder = _edited_copy(folders["gpt2"], tmp_path / "adapter", base_model_name_or_path=str(base))
    ours = quiet(lp.AutoPeftModelForCausalLM.from_pretrained, folder)
    assert type(ours.get_base_model()).__name__ == "GPT2LMHeadModel" and not marker.exists()


def test_tokenizer_beside_the_adapter_grows_the_embeddings_as_hf_peft(folders, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB + 6)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")))
    folder = _edited_copy(folders["gpt2"], tmp_path / "adapter")
    tokenizer.save_pretrained(folder)
    theirs, ours = _both("AutoPeftModelForCausalLM", folder)
    assert ours.get_input_embeddings().weight.shape[0] == theirs.get_input_embeddings().weight.shape[0] == VOCAB + 6


def test_signatures_start_as_hf_peft():
    for name in AUTO_NAMES:
        assert name in lp.__all__
        ours, theirs = getattr(lp, name).from_pretrained, getattr(peft, name).from_pretrained
        hf = [(p.name, p.default) for p in inspect.signature(theirs).parameters.values()]
        assert [(p.name, p.default) for p in inspect.signature(ours).parameters.values()] == hf
    assert dict(lp.auto.MODEL_TYPE_TO_PEFT_MODEL_MAPPING).keys() == peft.auto.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.keys()


# ---- HF PEFT's module paths ----------------------------------------------------------------------------------------
HF_PATHS = {
    "peft.peft_model": ["PeftModel", "PeftModelForCausalLM", "get_layer_status", "get_model_status"],
    "peft.config": ["PeftConfig"],
    "peft.mapping": ["get_peft_config", "inject_adapter_in_model", "PEFT_TYPE_TO_CONFIG_MAPPING"],
    "peft.mapping_func": ["get_peft_model"],
    "peft.auto": AUTO_NAMES + ["MODEL_TYPE_TO_PEFT_MODEL_MAPPING"],
    "peft.tuners.lora": ["LoraLayer", "Linear", "Embedding", "Conv2d", "LoraModel", "LoraConfig", "LoraRuntimeConfig"],
    "peft.tuners.tuners_utils": ["BaseTuner", "BaseTunerLayer"],
    "peft.utils": [
        "ModulesToSaveWrapper",
        "shift_tokens_right",
        "cast_mixed_precision_params",
        "get_base_model_state_dict",
        "set_base_model_state_dict",
    ],
    "peft.utils.other": ["ModulesToSaveWrapper", "shift_tokens_right", "cast_mixed_precision_params"],
    "peft.utils.save_and_load": [
        "get_peft_model_state_dict",
        "set_peft_model_state_dict",
        "load_peft_weights",
        "get_base_model_state_dict",
        "set_base_model_state_dict",
    ],
    "peft.utils.peft_types": ["PeftType", "TaskType"],
    "peft.utils.hotswap": ["hotswap_adapter", "hotswap_adapter_from_state_dict"],
}


@pytest.mark.parametrize("path", sorted(HF_PATHS))
def test_hf_module_paths_give_our_objects(path):
    theirs = importlib.import_module(path)
    ours = importlib.import_module("lightning_peft" + path.removeprefix("peft"))
    for name in HF_PATHS[path]:
        assert hasattr(theirs, name), f"{path}.{name}"  # the list is HF's
        obj = getattr(ours, name)
        if isinstance(obj, dict):
            assert obj is getattr(lp, name), f"{path}.{name}"
        else:
            assert obj.__module__.startswith("lightning_peft"), f"{path}.{name}"
        if hasattr(lp, name):
            assert obj is getattr(lp, name), f"{path}.{name}"
    from lightning_peft.tuners.base import BaseTuner, ModulesToSaveWrapper
    from lightning_peft.tuners.lora.layer import LoraLayer

    assert lpu.ModulesToSaveWrapper is ModulesToSaveWrapper
    assert importlib.import_module("lightning_peft.tuners.tuners_utils").BaseTuner is BaseTuner
    assert importlib.import_module("lightning_peft.tuners.lora").LoraLayer is LoraLayer
    with pytest.raises(AttributeError):
        lpu.NoSuchName  # noqa: B018


# ---- small helpers -------------------------------------------------------------------------------------------------
def test_lora_runtime_config_is_hf_peft_s():
    assert [(f.name, f.default) for f in dataclasses.fields(lp.LoraRuntimeConfig)] == [
        (f.name, f.default) for f in dataclasses.fields(peft.LoraRuntimeConfig)
    ]


def test_shift_tokens_right_as_hf_peft():
    labels = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    labels[0, 2:4] = -100
    labels[2, 6] = -100  # the last place drops out
    before = labels.clone()
    want = peft.utils.other.shift_tokens_right(labels, 0, 5)
    got = lp.shift_tokens_right(labels, 0, 5)
    assert torch.equal(got, want) and got.dtype == want.dtype and torch.equal(labels, before)
    assert (got == -100).sum() == 0 and got[0, 0] == 5
    for args, error in (((labels, None, 5), ValueError), ((labels[0], 0, 5), IndexError)):
        for fn in (peft.utils.other.shift_tokens_right, lp.shift_tokens_right):
            with pytest.raises(error):
                fn(*args)
    with pytest.raises(TypeError, match="input_ids must be a tensor"):
        lp.shift_tokens_right([[1, 2]], 0, 5)


def test_cast_mixed_precision_params_as_hf_peft():
    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    ours = lp.get_peft_model(tiny_gpt2(), lp.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    ours.load_state_dict(theirs.state_dict())
    params = {n: p for n, p in ours.named_parameters()}
    before = {n: p.detach().clone() for n, p in params.items()}
    for bad, error in ((torch.int8, ValueError), ("bfloat16", TypeError)):
        with pytest.raises(error, match="dtype must be"):
            lp.cast_mixed_precision_params(ours, bad)
        assert all(p.dtype == torch.float32 for p in ours.parameters())  # refused before any change
    peft.cast_mixed_precision_params(theirs, torch.bfloat16)
    lp.cast_mixed_precision_params(ours, torch.bfloat16)
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in theirs.named_parameters()}
    assert {p.dtype for p in ours.parameters()} == {torch.float32, torch.bfloat16}
    assert all(p is params[n] for n, p in ours.named_parameters())  # the same Parameter objects (an optimizer's)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.float(), before[name].to(p.dtype).float())
    torch.testing.assert_close(logits(ours, ids()), logits(theirs, ids()))


# ---- the base model's own weights ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "ia3", "prompt"])
def test_base_model_state_dict_as_hf_peft(method):
    """Keys and tensors equal to HF PEFT's (adapters left out, the original of a modules_to_save module kept); set
    loads new base weights into both alike and leaves the adapters; strict refusals (RuntimeError, as HF) and a wrong
    shape change nothing here."""
    base = tiny_bert_classifier()
    if method == "lora":
        make = {"r": 4, "target_modules": ["query", "value"]}
        configs = peft.LoraConfig(task_type="SEQ_CLS", **make), lp.LoraConfig(task_type="SEQ_CLS", **make)
    elif method == "ia3":
        make = {"target_modules": ["query", "intermediate.dense"], "feedforward_modules": ["intermediate.dense"]}
        configs = peft.IA3Config(task_type="SEQ_CLS", **make), lp.IA3Config(task_type="SEQ_CLS", **make)
    else:
        configs = (
            peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
            lp.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
        )
    theirs = quiet(peft.get_peft_model, copy.deepcopy(base), configs[0])
    ours = quiet(lp.get_peft_model, copy.deepcopy(base), configs[1])
    perturb(ours)  # trained adapters and head copy: not part of the base state
    quiet(peft.set_peft_model_state_dict, theirs, lp.get_peft_model_state_dict(ours))
    want, got = peft.get_base_model_state_dict(theirs), lp.get_base_model_state_dict(ours)
    if method == "prompt":  # HF peft 0.21 returns the raw state dict here, wrapper keys and the adapter's head copy
        want = {k.replace(".original_module", ""): v for k, v in want.items() if ".modules_to_save." not in k}
    assert list(got) == list(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value)
    assert got.keys() == base.state_dict().keys()

    new = {k: v + 0.01 for k, v in base.state_dict().items()}
    result = lp.set_base_model_state_dict(ours, new)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    if method != "prompt":  # (HF peft 0.21 wants the wrapper keys there: see above)
        peft.set_base_model_state_dict(theirs, new)
        torch.testing.assert_close(logits(ours, ids()), logits(theirs, ids()))
    for key in want:
        torch.testing.assert_close(lp.get_base_model_state_dict(ours)[key], new[key])

    before = {k: v.clone() for k, v in ours.state_dict().items()}
    broken = dict(new)
    first = next(iter(broken))
    broken["extra.weight"] = broken.pop(first)
    for lib, model in ((peft, theirs), (lp, ours)):
        with pytest.raises(RuntimeError, match="Missing key"):
            lib.set_base_model_state_dict(model, broken)
    got_result = lp.set_base_model_state_dict(ours, {"extra.weight": new[first]}, strict=False)
    assert (got_result.missing_keys, got_result.unexpected_keys) == (list(want), ["extra.weight"])
    if method != "prompt":
        want_result = peft.set_base_model_state_dict(theirs, {"extra.weight": new[first]}, strict=False)
        assert (got_result.missing_keys, got_result.unexpected_keys) == (
            list(want_result.missing_keys),
            list(want_result.unexpected_keys),
        )
    wrong = dict(new)
    wrong[first] = torch.zeros(2, 2)
    with pytest.raises(RuntimeError, match="size mismatch"):
        lp.set_base_model_state_dict(ours, wrong)
    with pytest.raises(TypeError, match="PeftModel"):
        lp.get_base_model_state_dict(base)
    after = ours.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_a_task_less_adapter_we_save_names_its_base_class_as_hf_peft_does(folders, tmp_path):
    """save_pretrained writes HF's `auto_mapping` for an adapter without a task type, so AutoPeftModel (ours and
    HF's) rebuilds the base from our folder too."""
    theirs = json.loads((folders["bert_none"] / "adapter_config.json").read_text())
    model = lp.get_peft_model(_saved_base(tiny_bert_classifier().bert, tmp_path / "bert"), lp.LoraConfig(r=4))
    model.save_pretrained(tmp_path / "ours")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (
        ours["auto_mapping"]
        == theirs["auto_mapping"]
        == {
            "base_model_class": "BertModel",
            "parent_library": "transformers.models.bert.modeling_bert",
        }
    )
    for library in (lp, peft):
        loaded = quiet(library.AutoPeftModel.from_pretrained, str(tmp_path / "ours"))
        assert type(loaded.get_base_model()).__name__ == "BertModel"
