"""Bad adapter folders and files: each is refused with a message naming the file and what to do, and a failed load
leaves the model untouched."""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import torch
from helpers import (
    GPT2_LORA,
    edit_config,
    load_fails,
    run_forked,
    snapshot,
    tiny_bert_classifier,
    tiny_gpt2,
    unchanged,
)
from safetensors.torch import load_file, save_file

import lightning_peft as lp


def test_missing_weights_file(saved_adapter):
    base, folder = saved_adapter
    (folder / "adapter_model.safetensors").unlink()
    load_fails(base, folder, "has no adapter_model.safetensors")


def test_missing_config_file(saved_adapter):
    base, folder = saved_adapter
    (folder / "adapter_config.json").unlink()
    load_fails(base, folder, "adapter_config.json is missing")


def test_config_file_that_is_not_json(saved_adapter):
    base, folder = saved_adapter
    (folder / "adapter_config.json").write_text("{not json")
    load_fails(base, folder, "is not valid JSON")


def test_truncated_safetensors(saved_adapter):
    base, folder = saved_adapter
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    load_fails(base, folder, "not a readable safetensors file.*truncated or corrupt")


def test_corrupt_safetensors_header(saved_adapter):
    base, folder = saved_adapter
    path = folder / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"garbage!"
    path.write_bytes(bytes(data))
    load_fails(base, folder, "not a readable safetensors file")


def test_extra_keys(saved_adapter):
    base, folder = saved_adapter
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"] = torch.zeros(8, 32)
    save_file(tensors, path)
    load_fails(base, folder, r"unexpected keys: base_model\.model\.transformer\.h\.0\.mlp\.c_fc\.lora_A\.weight")


def test_pickled_weights_are_refused_unless_opted_in(saved_adapter):
    base, folder = saved_adapter
    tensors = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    load_fails(base, folder, "pickles can run code, so it is refused.*allow_pickle=True")
    loaded = lp.PeftModel.from_pretrained(base, folder, allow_pickle=True)
    assert torch.equal(
        loaded.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].weight,
        tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"],
    )


def test_a_pickle_with_code_is_not_executed_even_when_opted_in(saved_adapter, tmp_path):
    base, folder = saved_adapter
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, folder / "adapter_model.bin")
    with pytest.raises(Exception, match="Weights only load failed"):
        lp.PeftModel.from_pretrained(base, folder, allow_pickle=True)
    assert not marker.exists()


def test_adapter_of_another_tuner_type_into_a_lora_model(saved_adapter, tmp_path):
    base, folder = saved_adapter
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    data = json.loads((other / "adapter_config.json").read_text())
    data["peft_type"] = "IA3"
    data = {k: v for k, v in data.items() if k in ("peft_type", "target_modules", "task_type", "fan_in_fan_out")}
    (other / "adapter_config.json").write_text(json.dumps(data))
    model = lp.PeftModel.from_pretrained(base, folder)
    with pytest.raises(ValueError, match="IA3.*LORA.*one PeftModel holds adapters of one tuner type"):
        model.load_adapter(other, adapter_name="other")
    assert list(model.peft_config) == ["default"]


def test_adapter_recorded_for_another_base_model(saved_adapter):
    base, folder = saved_adapter
    data = json.loads((folder / "adapter_config.json").read_text())
    data["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (folder / "adapter_config.json").write_text(json.dumps(data))
    base.config._name_or_path = "/models/gpt2"
    load_fails(base, folder, "trained on 'meta-llama/Llama-3.2-1B'.*ignore_base_model_mismatch=True")
    data["base_model_name_or_path"] = "openai-community/gpt2"  # same model, another place: accepted
    (folder / "adapter_config.json").write_text(json.dumps(data))
    lp.PeftModel.from_pretrained(base, folder)


def test_a_failed_load_into_an_existing_peft_model_adds_nothing(saved_adapter, tmp_path):
    base, folder = saved_adapter
    model = lp.PeftModel.from_pretrained(copy.deepcopy(base), folder)
    wrong = tmp_path / "wrong"
    lp.get_peft_model(tiny_gpt2(), lp.LoraConfig(r=4, **GPT2_LORA)).save_pretrained(wrong)
    tensors = load_file(wrong / "adapter_model.safetensors")
    tensors = {k: torch.zeros(4, 3) if "lora_A" in k else v for k, v in tensors.items()}  # the rank fits, not the width
    save_file(tensors, wrong / "adapter_model.safetensors")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"shape mismatches: .*file \(4, 3\) vs model \(4, 32\)"):
        model.load_adapter(wrong, adapter_name="second")
    assert list(model.peft_config) == ["default"]
    assert unchanged(model, before)


def test_a_failed_prompt_learning_load_gives_the_classifier_back(tmp_path):
    saved = lp.get_peft_model(tiny_bert_classifier(), lp.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    saved.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    head = "base_model.classifier.weight"
    tensors[head] = torch.zeros(2, tensors[head].shape[1])  # fails after the encoder and head copy were built
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    base = tiny_bert_classifier()
    base.bert.embeddings.requires_grad_(False)  # the user's own choice of what trains must survive too
    before = snapshot(base)
    with pytest.raises(
        ValueError, match=r"shape mismatches: base_model\.classifier\.weight: file \(2, 32\) vs model \(3, 32\)"
    ):
        lp.PeftModel.from_pretrained(base, tmp_path, is_trainable=True)
    assert type(base.classifier) is torch.nn.Linear
    assert not base.bert.embeddings.word_embeddings.weight.requires_grad and base.classifier.weight.requires_grad
    assert unchanged(base, before), "a failed load must leave the base model untouched"


def test_config_whose_rank_does_not_match_the_weights(saved_adapter):
    base, folder = saved_adapter
    edit_config(folder, r=4)
    load_fails(
        base,
        folder,
        r"r=4 in adapter_config\.json does not fit the weights: .*adapter_model\.safetensors holds "
        r"base_model\.model\.transformer\.h\.0\.attn\.c_attn\.lora_A\.weight of shape \(8, 32\) \(rank 8\)",
    )


def test_weights_file_missing_a_tensor(saved_adapter):
    base, folder = saved_adapter
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
    save_file(tensors, path)
    load_fails(
        base,
        folder,
        r"missing keys: base_model\.model\.transformer\.h\.1\.attn\.c_attn\.lora_B\.weight\)\. "
        "Load the adapter into the base model",
    )


def test_config_recorded_for_another_peft_type_than_its_weights(saved_adapter):
    base, folder = saved_adapter
    data = json.loads((folder / "adapter_config.json").read_text())
    data = {k: v for k, v in data.items() if k in ("target_modules", "task_type", "fan_in_fan_out")}
    (folder / "adapter_config.json").write_text(json.dumps({**data, "peft_type": "IA3"}))
    load_fails(base, folder, r"missing keys: .*ia3_l.*unexpected keys: .*lora_A\.weight")


def test_config_with_a_wrong_value(saved_adapter):
    base, folder = saved_adapter
    edit_config(folder, r="x")
    load_fails(base, folder, "r must be a positive integer \\(the LoRA rank\\), got 'x'")


def test_config_of_an_unknown_tuner(saved_adapter):
    base, folder = saved_adapter
    edit_config(folder, peft_type="LOHA")
    load_fails(base, folder, "unknown peft_type 'LOHA'; lightning_peft knows: IA3, LORA, PREFIX_TUNING")


def test_empty_weights_file(saved_adapter):
    base, folder = saved_adapter
    (folder / "adapter_model.safetensors").write_bytes(b"")
    load_fails(base, folder, "not a readable safetensors file .*header too small.*export the adapter again")


def test_exported_files_are_readable_like_any_other_file(tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        lp.get_peft_model(tiny_gpt2(), lp.LoraConfig(**GPT2_LORA)).save_pretrained(tmp_path / "fresh")
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert stat.S_IMODE(os.stat(tmp_path / "fresh" / name).st_mode) == 0o644, name
    finally:
        os.umask(umask)


# ---- a small file cannot exhaust the machine or hang the loader -------------------------------------------------
CHILD_LOAD = """
import resource, sys
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.path.insert(0, "tests")
from helpers import tiny_gpt2
import lightning_peft as lp
try:
    lp.PeftModel.from_pretrained(tiny_gpt2(), sys.argv[1], is_trainable=True)
except ValueError as err:
    print("REFUSED", err)
else:
    print("LOADED")
"""


def load_in_child(folder, limit_bytes=3 * 2**30, timeout=120, code=CHILD_LOAD):
    """from_pretrained(tiny GPT-2, folder) in a child process whose address space is capped; its stdout. The child
    is forked from the preloaded fork server of tests/helpers.py (a new process without paying the imports again;
    it caps its address space itself, as the code above says)."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = run_forked(
        ["-c", code, str(folder), str(limit_bytes)],
        timeout=timeout,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_a_huge_rank_in_a_small_folder_is_refused_before_anything_is_allocated(saved_adapter):
    _, folder = saved_adapter
    # r=10**7 (6.5 GB of LoRA A/B over tiny GPT-2) is now refused by the absolute bound (2**20) before any file
    # is read; just below it, the file check is what refuses
    edit_config(folder, r=10**6)
    assert sum(f.stat().st_size for f in folder.iterdir()) < 20_000
    out = load_in_child(folder)  # 3 GB of address space
    assert "REFUSED r=1000000 in adapter_config.json does not fit the weights" in out, out
    assert "c_attn.lora_A.weight of shape (8, 32) (rank 8)" in out


def test_a_rank_pattern_larger_than_every_saved_rank_is_refused(saved_adapter):
    base, folder = saved_adapter
    edit_config(folder, rank_pattern={"c_proj": 10**6}, target_modules=["c_attn", "c_proj"])
    load_fails(base, folder, r"rank_pattern\['c_proj'\]=1000000 in adapter_config\.json.*no saved rank is above 8")


def test_a_huge_number_of_virtual_tokens_in_a_small_folder_is_refused(tmp_path):
    lp.get_peft_model(tiny_gpt2(), lp.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(
        tmp_path
    )
    edit_config(tmp_path, num_virtual_tokens=10**6)  # (10**9 is refused by the absolute bound, 2**20)
    out = load_in_child(tmp_path)
    assert "REFUSED num_virtual_tokens=1000000 in adapter_config.json does not fit the weights" in out, out
    assert "prompt_embeddings of shape (4, 32)" in out


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(token_dim=10**9), r"token_dim=1000000000 in adapter_config\.json.*rows of width 32"),
        (dict(num_transformer_submodules=2), r"num_transformer_submodules=2 .*prompt_embeddings of shape \(4, 32\)"),
    ],
)
def test_prompt_sizes_that_cannot_fit_the_saved_embeddings(tmp_path, changes, message):
    lp.get_peft_model(tiny_gpt2(), lp.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(
        tmp_path
    )
    edit_config(tmp_path, **changes)
    load_fails(tiny_gpt2(), tmp_path, message)


def test_prefix_sizes_that_cannot_fit_the_saved_prefix(tmp_path):
    config = lp.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    lp.get_peft_model(tiny_gpt2(), config).save_pretrained(tmp_path)  # prompt_embeddings (4, 2 layers x 2 x 32)
    edit_config(tmp_path, num_layers=10**6)
    load_fails(tiny_gpt2(), tmp_path, r"num_layers=1000000 in adapter_config\.json.*width 128")


def test_a_regex_that_would_hang_matching_is_refused_naming_the_field(saved_adapter):
    _, folder = saved_adapter
    edit_config(folder, target_modules="(.*.*)*c_attnX")  # backtracking on every module name: hung from_pretrained
    out = load_in_child(folder, timeout=60)
    assert "REFUSED target_modules='(.*.*)*c_attnX' repeats a group that itself repeats" in out, out


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(rank_pattern={"(a+)+c_attn": 4}), r"rank_pattern key '\(a\+\)\+c_attn' repeats a group"),
        (dict(alpha_pattern={".*.*.*.*.*c": 4.0}), "alpha_pattern key '.*' has 5 variable-length repetitions"),
        (dict(target_modules="x" * 10_000), r"target_modules='xxx.*\(10002 characters\) is longer than 500"),
        (
            dict(layers_to_transform=[0], layers_pattern="h" * 1000),
            r"layers_pattern must be the name .*got 'hhhh.*\(1002 characters\)",
        ),
    ],
)
def test_patterns_from_a_file_are_bounded(saved_adapter, changes, message):
    base, folder = saved_adapter
    edit_config(folder, **changes)
    load_fails(base, folder, message)


def test_long_values_are_quoted_cut_short(saved_adapter):
    base, folder = saved_adapter
    edit_config(folder, bias="b" * 100_000)
    with pytest.raises(ValueError, match=r"bias='bbbb.*\(100002 characters\) is not valid") as err:
        lp.PeftModel.from_pretrained(base, folder)
    assert len(str(err.value)) < 300


# ---- an untrusted config cannot reach the network or run code --------------------------------------------------
HOSTILE_TOKENIZER = dict(
    prompt_tuning_init="TEXT",
    prompt_tuning_init_text="a review of the film",
    tokenizer_name_or_path="/nonexistent/evil-tokenizer",
    tokenizer_kwargs=dict(
        local_files_only=False, revision="evil", token="hf_stolen", cache_dir="/tmp/evil", trust_remote_code=True
    ),
)


def _patched_tokenizer(monkeypatch):
    """AutoTokenizer.from_pretrained replaced by a recorder that raises; returns the list of recorded calls."""
    import transformers

    calls = []

    def from_pretrained(name, **kwargs):
        calls.append((name, kwargs))
        raise OSError("a tokenizer was loaded")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    return calls


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_bert_classifier], ids=["causal_lm", "seq_cls"])
def test_loading_saved_prompt_weights_loads_no_tokenizer(tmp_path, monkeypatch, build):
    task = "CAUSAL_LM" if build is tiny_gpt2 else "SEQ_CLS"
    saved = lp.get_peft_model(build(), lp.PromptTuningConfig(task_type=task, num_virtual_tokens=4))
    saved.save_pretrained(tmp_path)
    edit_config(tmp_path, **HOSTILE_TOKENIZER)
    calls = _patched_tokenizer(monkeypatch)
    loaded = lp.PeftModel.from_pretrained(build(), tmp_path, is_trainable=True)
    assert calls == []
    assert torch.equal(
        loaded.prompt_encoder["default"].embedding.weight, saved.prompt_encoder["default"].embedding.weight
    )
    # the patch is live: the same TEXT init built in code does reach it
    with pytest.raises(ValueError, match="could not load the tokenizer"):
        lp.get_peft_model(build(), lp.PromptTuningConfig(task_type=task, num_virtual_tokens=4, **HOSTILE_TOKENIZER))
    assert calls[0][1]["revision"] == "evil" and calls[0][1]["local_files_only"] is False  # the user's own kwargs
    assert "trust_remote_code" not in calls[0][1]


def test_tokenizer_kwargs_from_a_file_never_go_online_or_run_code(tmp_path, monkeypatch):
    saved = lp.get_peft_model(tiny_gpt2(), lp.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    saved.save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()  # a config alone: a fresh adapter is built from it
    edit_config(tmp_path, inference_mode=False, **HOSTILE_TOKENIZER)
    config = lp.PeftConfig.from_pretrained(tmp_path)
    calls = _patched_tokenizer(monkeypatch)
    with pytest.raises(ValueError, match="could not load the tokenizer .*from local files"):
        lp.get_peft_model(tiny_gpt2(), config)
    assert calls == [("/nonexistent/evil-tokenizer", {"local_files_only": True})]
    assert "_source_dir" not in json.loads((tmp_path / "adapter_config.json").read_text())
    saved.peft_config["default"].save_pretrained(tmp_path / "again")
    assert "_source_dir" not in json.loads((tmp_path / "again" / "adapter_config.json").read_text())


def test_a_file_cannot_claim_to_be_code(saved_adapter):
    _, folder = saved_adapter
    edit_config(folder, _source_dir=None)
    assert lp.PeftConfig.from_pretrained(folder)._source_dir == str(folder)


# ---- non-finite and integer tensors are never taken silently ----------------------------------------------------
LORA_B0 = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapter_weights_are_refused(saved_adapter, value):
    base, folder = saved_adapter
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[LORA_B0][0, 0] = value
    save_file(tensors, path)
    load_fails(base, folder, rf"hold NaN or inf values in 1 tensors: {re.escape(LORA_B0)}\..*allow_nonfinite=True")


def test_non_finite_adapter_weights_load_when_opted_in(saved_adapter):
    base, folder = saved_adapter
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors[LORA_B0][0, 0] = float("nan")
    model = lp.get_peft_model(base, lp.LoraConfig(**GPT2_LORA))
    with pytest.raises(ValueError, match="hold NaN or inf values"):
        lp.set_peft_model_state_dict(model, tensors)
    assert torch.isfinite(model.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].weight).all()
    lp.set_peft_model_state_dict(model, tensors, allow_nonfinite=True)
    assert torch.isnan(model.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].weight[0, 0])


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_integer_or_bool_tensors_where_weights_belong_are_refused(saved_adapter, dtype):
    base, folder = saved_adapter
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[LORA_B0] = torch.ones(tensors[LORA_B0].shape, dtype=dtype)  # would be cast to 1.0 silently
    save_file(tensors, path)
    load_fails(base, folder, rf"integer or bool tensors where the model has float weights: {re.escape(LORA_B0)}")


def test_non_finite_prompt_embeddings_are_refused(tmp_path):
    lp.get_peft_model(tiny_gpt2(), lp.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(
        tmp_path
    )
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["prompt_embeddings"][1, 2] = float("-inf")
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    load_fails(tiny_gpt2(), tmp_path, "hold NaN or inf values in 1 tensors: prompt_embeddings")


# Lightning: checkpoints (the state's load pre-hook), exports and merges
class _Module(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = tiny_gpt2()


def _module_with_state():
    from lightning_peft.lightning._state import AdapterState, attach_state

    module = _Module()
    state = attach_state(module, AdapterState(lp.LoraConfig(**GPT2_LORA)))
    state.inject(module)
    with torch.no_grad():
        module.model.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].weight.fill_(0.01)
    return module, state


LIGHTNING_B0 = "model.base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"


def test_a_checkpoint_with_a_non_finite_adapter_is_refused_unless_opted_in():
    module, state = _module_with_state()
    checkpoint = {k: v.clone() for k, v in module.state_dict().items()}
    checkpoint[LIGHTNING_B0][0, 0] = float("nan")
    before = snapshot(module)
    with pytest.raises(
        ValueError, match=rf"refusing to load .*NaN or inf values in 1 tensors: {re.escape(LIGHTNING_B0)}"
    ):
        module.load_state_dict(checkpoint)
    assert unchanged(module, before)
    state.allow_nonfinite = True
    module.load_state_dict(checkpoint)
    assert torch.isnan(module.state_dict()[LIGHTNING_B0][0, 0])


def test_a_checkpoint_with_integer_adapter_tensors_is_refused():
    module, _ = _module_with_state()
    checkpoint = dict(module.state_dict())
    checkpoint[LIGHTNING_B0] = torch.ones(checkpoint[LIGHTNING_B0].shape, dtype=torch.int32)
    before = snapshot(module)
    with pytest.raises(ValueError, match=rf"integer or bool tensors .*{re.escape(LIGHTNING_B0)} \(torch\.int32\)"):
        module.load_state_dict(checkpoint)
    assert unchanged(module, before)


def test_a_non_finite_adapter_is_never_exported_or_merged(tmp_path):
    module, state = _module_with_state()
    state.save_adapter(str(tmp_path / "adapter"))  # a finite adapter exports
    exported = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        module.model.base_model.model.transformer.h[1].attn.c_attn.lora_A["default"].weight[0, 0] = float("nan")
    with pytest.raises(
        ValueError,
        match=r"holds NaN or inf values in 1 tensors \(.*h\.1\.attn\.c_attn\.lora_A\.weight\); "
        "refusing to export",
    ):
        state.save_adapter(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == exported
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="refusing to merge it into the base model"):
        state.merged_model()
    assert isinstance(module.model, lp.PeftModel)
    after = module.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.allclose(after[k], v, rtol=0, atol=0, equal_nan=True) for k, v in before.items())


@pytest.mark.parametrize("kind", ["directory", "fifo", "dangling symlink"])
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_something_else_where_a_file_belongs_is_named_as_what_it_is(saved_adapter, kind, name):
    import os

    base, folder = saved_adapter
    target = folder / name
    target.unlink()
    if kind == "directory":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)  # opening it for reading would block: it must never be opened
    else:
        target.symlink_to(folder / "gone")
    expected = {
        "directory": "a directory, not a file",
        "fifo": r"a FIFO \(named pipe\), not a file",
        "dangling symlink": "a symlink to .*gone', which does not exist",
    }
    load_fails(base, folder, rf"{name} is {expected[kind]}")


def test_layers_to_transform_out_of_range_is_blamed_on_itself():
    before = snapshot(base := tiny_gpt2())
    with pytest.raises(
        ValueError, match=r"layers_to_transform=\[99\] names layers \[99\] that the model does not have"
    ):
        lp.get_peft_model(base, lp.LoraConfig(layers_to_transform=[99], **GPT2_LORA))
    assert unchanged(base, before)
    with pytest.warns(UserWarning, match=r"names layers \[7\] .* numbered 0..1; those are skipped"):
        model = lp.get_peft_model(tiny_gpt2(), lp.LoraConfig(layers_to_transform=[0, 7], **GPT2_LORA))
    assert [n for n, _ in model.named_modules() if n.endswith("c_attn.lora_A")] == [
        "base_model.model.transformer.h.0.attn.c_attn.lora_A"
    ]


def test_from_pretrained_and_load_adapter_take_the_non_finite_opt_in(saved_adapter, tmp_path):
    base, folder = saved_adapter
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[LORA_B0][0, 0] = float("nan")
    save_file(tensors, path)
    model = lp.PeftModel.from_pretrained(copy.deepcopy(base), folder, allow_nonfinite=True)
    assert torch.isnan(model.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].weight[0, 0])
    with pytest.raises(ValueError, match="hold NaN or inf values"):
        model.load_adapter(folder, adapter_name="second")
    assert "second" not in model.peft_config
    model.load_adapter(folder, adapter_name="second", allow_nonfinite=True)
    assert torch.isnan(model.base_model.model.transformer.h[0].attn.c_attn.lora_B["second"].weight[0, 0])


# ---- every size a file claims is backed by the file before anything is allocated at it -------------------------
CHILD_LOAD_BIN = CHILD_LOAD.replace("is_trainable=True)", "is_trainable=True, allow_pickle=True)")


def _rewrite_weights(folder, keep):
    path = folder / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if keep(k)}
    save_file(tensors, path)


@pytest.mark.parametrize(
    "keep,held",
    [
        (lambda k: False, "it holds no tensors"),  # an empty (valid) safetensors file
        (lambda k: "lora_B" in k, "it holds base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"),
    ],
)
def test_a_lora_file_without_lora_a_backs_no_rank(saved_adapter, keep, held):
    _, folder = saved_adapter
    _rewrite_weights(folder, keep)
    edit_config(folder, r=10**6)  # below the absolute bound; no lora_A to compare it with
    out = load_in_child(folder)
    assert "REFUSED" in out and "adapter_model.safetensors holds no lora_A tensor" in out, out
    assert held in out and "the file is not this adapter's weights" in out


def test_a_lora_file_holding_only_modules_to_save_tensors_is_refused(tmp_path):
    model = lp.get_peft_model(
        tiny_bert_classifier(), lp.LoraConfig(target_modules=["query"], modules_to_save=["classifier"])
    )
    model.save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda k: "lora_" not in k)
    edit_config(tmp_path, r=10**6)
    load_fails(tiny_bert_classifier(), tmp_path, r"holds no lora_A tensor .*it holds base_model\.model\.classifier")


def test_a_pickled_bin_is_checked_against_the_config_before_building(saved_adapter):
    _, folder = saved_adapter
    tensors = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    edit_config(folder, r=10**6)
    out = load_in_child(folder, code=CHILD_LOAD_BIN)  # 3 GB of address space, allow_pickle=True
    assert "REFUSED r=1000000 in adapter_config.json does not fit the weights: " in out, out
    assert "adapter_model.bin holds base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in out


def test_a_pickled_bin_that_fits_still_loads(saved_adapter):
    base, folder = saved_adapter
    tensors = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    model = lp.PeftModel.from_pretrained(base, folder, allow_pickle=True)
    assert torch.equal(lp.get_peft_model_state_dict(model)[LORA_B0], tensors[LORA_B0])


def _saved_prompt(tmp_path, config):
    lp.get_peft_model(tiny_gpt2(), config).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "tensors,found",
    [
        ({}, "it holds no tensors"),
        ({"prompt_embeddings": torch.zeros(4)}, r"its prompt_embeddings has shape \(4,\)"),
        ({"x": torch.zeros(4, 32)}, "it holds x"),
    ],
)
def test_a_prompt_file_without_2d_prompt_embeddings_backs_no_size(tmp_path, tensors, found):
    folder = _saved_prompt(tmp_path, lp.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    save_file(tensors, folder / "adapter_model.safetensors")
    edit_config(folder, num_virtual_tokens=10**6, token_dim=10**6)  # 4 TB of embedding if built
    out = load_in_child(folder)
    assert "REFUSED" in out and "holds no 2-D prompt_embeddings tensor" in out, out
    assert re.search(found, out), out


def test_prefix_num_layers_must_be_the_models(tmp_path):
    folder = _saved_prompt(tmp_path, lp.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    edit_config(folder, num_layers=3)  # fits width 128 / 2, but tiny GPT-2 has 2 layers
    load_fails(tiny_gpt2(), folder, r"PrefixTuningConfig\.num_layers=3 but the model has 2 layers")


def test_prefix_sizes_must_give_exactly_the_saved_shape_before_building(tmp_path):
    folder = _saved_prompt(tmp_path, lp.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    edit_config(folder, token_dim=64)  # each size alone fits width 128; together 2 x 2 x 64 = 256 does not
    load_fails(
        tiny_gpt2(),
        folder,
        r"the sizes in adapter_config\.json \(.*token_dim=64.*\) give prompt_embeddings of shape \(4, 256\), but "
        r".*holds shape \(4, 128\)",
    )


@pytest.mark.parametrize(
    "config,changes",
    [
        (lp.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), dict(encoder_hidden_size=10**6)),
        (
            lp.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_reparameterization_type="LSTM"),
            dict(encoder_hidden_size=10**6, encoder_num_layers=64),
        ),
        (
            lp.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True),
            dict(encoder_hidden_size=10**8),
        ),
    ],
    ids=["p-tuning-mlp", "p-tuning-lstm", "prefix-projection"],
)
def test_encoder_sizes_from_a_file_are_never_allocated(tmp_path, config, changes):
    # the saved rows replace the reparameterisation on load, so loading builds the plain embedding directly
    folder = _saved_prompt(tmp_path, config)
    edit_config(folder, **changes)  # MLP / LSTM at these widths: terabytes
    out = load_in_child(folder)  # is_trainable=True
    assert out.strip() == "LOADED", out
    with pytest.warns(UserWarning, match="holds the encoder's output only"):
        model = lp.PeftModel.from_pretrained(tiny_gpt2(), folder, is_trainable=True)
    encoder = model.prompt_encoder["default"]
    assert not encoder.reparameterized and encoder.embedding.weight.requires_grad


def test_values_that_overflow_the_models_dtype_are_refused(saved_adapter):
    base, folder = saved_adapter
    tensors = {k: v.double() for k, v in load_file(folder / "adapter_model.safetensors").items()}
    tensors[LORA_B0][0, 0] = 1e300  # finite in float64, inf once cast to the model's float32
    save_file(tensors, folder / "adapter_model.safetensors")
    load_fails(base, folder, rf"NaN or inf values in 1 tensors: {re.escape(LORA_B0)}\. .*once cast to the model's")
    model = lp.PeftModel.from_pretrained(base, folder, allow_nonfinite=True)  # the same opt-in
    assert torch.isinf(lp.get_peft_model_state_dict(model)[LORA_B0][0, 0])


def test_float32_values_beyond_float16_are_refused_for_a_float16_model(tmp_path):
    # LoRA weights train in float32 over a float16 base; a modules_to_save copy keeps the module's float16
    config = lp.LoraConfig(target_modules=["query"], modules_to_save=["classifier"])
    lp.get_peft_model(tiny_bert_classifier(), config).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("classifier.weight"))
    tensors[key][0, 0] = 1e5  # float16 tops out at 65504
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    load_fails(tiny_bert_classifier().half(), tmp_path, rf"NaN or inf values in 1 tensors: {re.escape(key)}\.")


def test_a_config_file_nested_too_deeply_is_named(saved_adapter):
    base, folder = saved_adapter
    (folder / "adapter_config.json").write_text("[" * 200_000 + "]" * 200_000)
    load_fails(base, folder, r"adapter_config\.json is not a valid adapter config \(its JSON is nested too deeply\)")


def test_a_conditional_group_regex_from_a_file_does_not_hang(saved_adapter):
    _, folder = saved_adapter
    edit_config(folder, target_modules=r"()(?(1)(.+)+!)")  # ran for minutes per module name
    out = load_in_child(folder, timeout=60)
    assert "REFUSED target_modules='()(?(1)(.+)+!)' uses a conditional group" in out, out


def test_an_inline_global_flag_in_a_file_key_is_named(saved_adapter):
    base, folder = saved_adapter
    edit_config(folder, alpha_pattern={"(?i)c_attn": 4})
    load_fails(base, folder, r"alpha_pattern key '\(\?i\)c_attn' cannot be used as a key")
