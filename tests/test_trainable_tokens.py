"""The TrainableTokens tuner (`TrainableTokensConfig` / `TrainableTokensModel`, peft type TRAINABLE_TOKENS): only the
rows `token_indices` of an embedding train. Compared with HF `peft` 0.21 on a tiny GPT-2 (tied LM head), Llama (untied
and tied) and T5 (shared embedding, tied LM head) with added tokens: files both ways, logits, saved keys, merge /
unload, several adapters, the config HF writes, errors of HF's types; refused calls change nothing; and what the app
does with `tuner=trainable_tokens`."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from helpers import quiet, saved_shapes, snapshot, tiny_gpt2, tiny_llama, tiny_t5, unchanged
from torch import nn

import lightning_peft as lp
from lightning_peft.tuners.lora.trainable_tokens import TrainableTokensLayer
from lightning_peft.tuners.trainable_tokens import TrainableTokensModel

X = torch.tensor([[1, 64, 65, 66, 3], [66, 2, 64, 5, 65]])  # added tokens 64..66 and old ones
NEW = [64, 65]


def _base(kind: str) -> nn.Module:
    if kind == "t5":
        model = tiny_t5()
    elif kind == "gpt2":
        model = tiny_gpt2()
    else:
        model = tiny_llama(tie_word_embeddings=kind == "llama-tied")
    quiet(model.resize_token_embeddings, 70)  # tokens added (and a few spare rows)
    return model.eval()


def _logits(model: nn.Module) -> torch.Tensor:
    kwargs = {"decoder_input_ids": X[:, :3]} if model.config.model_type == "t5" else {}
    with torch.no_grad():
        return model(input_ids=X, **kwargs).logits


def _shift_rows(model: nn.Module, seed: int = 3) -> None:
    """Give every trained row a non-trivial value (seeded, in name order)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module", params=["gpt2", "llama", "llama-tied", "t5"])
def hf_folder(request, tmp_path_factory):
    base = _base(request.param)
    hf = quiet(peft.get_peft_model, copy.deepcopy(base), peft.TrainableTokensConfig(token_indices=NEW))
    _shift_rows(hf)
    folder = tmp_path_factory.mktemp(f"hf-{request.param}")
    hf.save_pretrained(folder)
    return base, hf.eval(), folder


@pytest.mark.parity("TRAINABLE_TOKENS")
def test_files_both_ways_logits_keys_and_merge_as_hf(hf_folder, tmp_path):
    base, hf, folder = hf_folder
    ours = lp.PeftModel.from_pretrained(copy.deepcopy(base), folder)
    assert isinstance(ours.tuner, TrainableTokensModel)
    torch.testing.assert_close(_logits(ours), _logits(hf))
    assert not torch.allclose(_logits(ours), _logits(base))
    ours.save_pretrained(tmp_path)
    assert saved_shapes(tmp_path) == saved_shapes(folder)  # the literal key set (a tied LM head's rows too)
    assert any(k.endswith(".trainable_tokens_delta") for k in saved_shapes(tmp_path))
    back = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_logits(back), _logits(ours))
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, TrainableTokensLayer) for m in merged.modules())
    hf_merged = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), folder).merge_and_unload()
    torch.testing.assert_close(_logits(merged), _logits(hf_merged))
    torch.testing.assert_close(_logits(merged), _logits(hf))


@pytest.mark.parity("TRAINABLE_TOKENS")
@pytest.mark.parametrize("kind", ["gpt2", "llama-tied"])
def test_fresh_adapter_parameters_flags_and_logits_as_hf(kind):
    base = _base(kind)
    hf = quiet(peft.get_peft_model, copy.deepcopy(base), peft.TrainableTokensConfig(token_indices=NEW))
    ours = lp.get_peft_model(copy.deepcopy(base), lp.TrainableTokensConfig(token_indices=NEW))
    assert [(n, p.requires_grad) for n, p in ours.named_parameters() if p.requires_grad] == [
        (n, p.requires_grad) for n, p in hf.named_parameters() if p.requires_grad
    ]
    assert ours.peft_config["default"].target_modules == hf.peft_config["default"].target_modules
    torch.testing.assert_close(_logits(ours), _logits(hf))  # rows start at their values: no change
    torch.testing.assert_close(_logits(ours), _logits(base))
    # one step: only the listed rows move, the tied LM head follows them
    ours.train()
    ours(input_ids=X, labels=X).loss.backward()
    torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1.0).step()
    embed = ours.get_input_embeddings()
    assert isinstance(embed, TrainableTokensLayer)
    torch.testing.assert_close(embed.get_base_layer().weight, base.get_input_embeddings().weight, rtol=0, atol=0)
    weight = embed.get_merged_weights(["default"])
    assert not torch.equal(weight[NEW], base.get_input_embeddings().weight[NEW])
    assert torch.equal(weight[:64], base.get_input_embeddings().weight[:64])


@pytest.mark.parity("TRAINABLE_TOKENS")
def test_config_read_from_the_file_hf_writes(tmp_path):
    base = _base("llama")
    config = peft.TrainableTokensConfig(token_indices=[3, 66], target_modules=["embed_tokens"], init_weights=False)
    quiet(peft.get_peft_model, copy.deepcopy(base), config).save_pretrained(tmp_path)
    ours = lp.PeftConfig.from_pretrained(tmp_path)
    assert type(ours) is lp.TrainableTokensConfig and ours.peft_type == "TRAINABLE_TOKENS"
    assert (ours.token_indices, ours.init_weights, set(ours.target_modules)) == ([3, 66], False, {"embed_tokens"})
    model = lp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    hf = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_logits(model), _logits(hf))  # random rows (init_weights=False), as saved
    # what we write reads back in HF as the same config
    model.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: v for k, v in written.items() if k != "peft_version"} == {
        k: v for k, v in theirs.items() if k != "peft_version"
    }
    back = quiet(peft.PeftConfig.from_pretrained, tmp_path / "ours")
    assert (back.token_indices, back.init_weights, back.target_modules) == ([3, 66], False, ["embed_tokens"])


@pytest.mark.parity("TRAINABLE_TOKENS")
def test_several_adapters_with_disjoint_rows_run_together_as_hf():
    base = _base("llama")
    models = []
    for lib in (peft, lp):
        model = quiet(lib.get_peft_model, copy.deepcopy(base), lib.TrainableTokensConfig(token_indices=[64]))
        quiet(model.add_adapter, "two", lib.TrainableTokensConfig(token_indices=[65, 66]))
        quiet(model.add_adapter, "clash", lib.TrainableTokensConfig(token_indices=[66]))
        _shift_rows(model)
        with torch.no_grad():  # the frozen adapters get values too (the same ones in both)
            for name in ("two", "clash"):
                model.get_input_embeddings().trainable_tokens_delta[name].fill_(0.25 if name == "two" else -1.0)
        model.base_model.set_adapter(["default", "two"])
        models.append(model)
    hf, ours = models
    torch.testing.assert_close(_logits(ours), _logits(hf))
    for model in models:  # overlapping rows: refused at the forward, as HF
        model.base_model.set_adapter(["two", "clash"])
        with pytest.raises(ValueError, match="Token indices of adapter clash are already defined"):
            _logits(model)
    ours.base_model.set_adapter("two")
    ours.delete_adapter("default")
    assert sorted(n for n, _ in ours.named_parameters() if "trainable_tokens_delta" in n) == [
        "base_model.model.model.embed_tokens.trainable_tokens_delta.clash",
        "base_model.model.model.embed_tokens.trainable_tokens_delta.two",
    ]


@pytest.mark.parity("TRAINABLE_TOKENS")
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(token_indices=[64, 70]), IndexError, r"token_indices: \[70\] are out of range for transformer.wte"),
        (dict(token_indices=[-1]), IndexError, r"token_indices holds negative token indices \[-1\]"),
        (dict(token_indices=[1], target_modules=["nope"]), peft.utils.NoMatchingPeftModuleError, "matched no module"),
    ],
)
def test_bad_indices_and_targets_raise_hfs_types_and_change_nothing(kwargs, error, match):
    base = _base("gpt2")
    with pytest.raises(error):  # HF's type for the same mistake (at creation or at the first forward)
        quiet(peft.get_peft_model, copy.deepcopy(base), peft.TrainableTokensConfig(**kwargs))(X)
    our_error = lp.NoMatchingPeftModuleError if error is peft.utils.NoMatchingPeftModuleError else error
    before = snapshot(base)
    with pytest.raises(our_error, match=match):
        lp.get_peft_model(base, lp.TrainableTokensConfig(**kwargs))
    assert unchanged(base, before)
    # the same mistake as a second adapter: the model and its adapters as they were
    model = lp.get_peft_model(copy.deepcopy(base), lp.TrainableTokensConfig(token_indices=NEW))
    before = snapshot(model)
    with pytest.raises(our_error, match=match):
        model.add_adapter("second", lp.TrainableTokensConfig(**kwargs))
    assert unchanged(model, before) and list(model.peft_config) == ["default"]


def test_adversary_calls_are_refused_and_change_nothing():
    base = _base("gpt2")
    with pytest.raises(TypeError, match=r"token_indices must be a list of token indices \(ints\), got 'abc'"):
        lp.TrainableTokensConfig(token_indices="abc")
    with pytest.raises(TypeError, match="init_weights must be True or False"):
        lp.TrainableTokensConfig(token_indices=[1], init_weights="no")
    with pytest.raises(ValueError, match=r"token_indices lists token indices \[5\] more than once"):
        lp.TrainableTokensConfig(token_indices=[5, 5])
    before = snapshot(base)
    with pytest.raises(ValueError, match="token_indices is empty; list the indices"):
        lp.get_peft_model(base, lp.TrainableTokensConfig())  # HF's default, an empty list
    with pytest.raises(TypeError, match=r"names transformer.h.0.attn.c_attn, a Conv1D: only an nn.Embedding"):
        lp.get_peft_model(base, lp.TrainableTokensConfig(token_indices=[1], target_modules=["c_attn"]))
    assert unchanged(base, before)
    model = lp.get_peft_model(copy.deepcopy(base), lp.TrainableTokensConfig(token_indices=NEW))
    before = snapshot(model)
    with pytest.raises(ValueError, match="cannot add a LORA adapter to a TRAINABLE_TOKENS model"):
        model.add_adapter("lora", lp.LoraConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="an adapter named 'default' already exists"):
        model.add_adapter("default", lp.TrainableTokensConfig(token_indices=[3]))
    with pytest.raises(ValueError, match="already carries a live adapter"):
        lp.get_peft_model(model.get_base_model(), lp.TrainableTokensConfig(token_indices=[3]))
    assert unchanged(model, before) and list(model.peft_config) == ["default"]


# ---------------------------------------------------------------- the app
@pytest.mark.parity("TRAINABLE_TOKENS")
def test_a_classifier_head_stays_frozen_as_in_hf_so_the_app_refuses_the_classification_recipe():
    from helpers import tiny_bert_classifier
    from test_app import compose

    from lightning_peft.app.train import build, check_tuner_trains_head, tuner_config

    # HF: TrainableTokensConfig has no modules_to_save, so a SEQ_CLS model's new head is not trained
    base = tiny_bert_classifier()
    kwargs = dict(task_type="SEQ_CLS", token_indices=[5, 6])
    hf = quiet(peft.get_peft_model, copy.deepcopy(base), peft.TrainableTokensConfig(**kwargs))
    ours = lp.get_peft_model(copy.deepcopy(base), lp.TrainableTokensConfig(**kwargs))
    trained = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trained == [n for n, p in hf.named_parameters() if p.requires_grad]
    assert trained == ["base_model.model.bert.embeddings.word_embeddings.trainable_tokens_delta.default"]
    # the default recipe (classification with a new head) refuses it before any model is built, saying what to do
    cfg = compose(["tuner=trainable_tokens"])
    config = tuner_config(cfg)
    assert type(config) is lp.TrainableTokensConfig and config.token_indices == [101, 102]
    with pytest.raises(ValueError, match=r"TrainableTokensConfig cannot train the new classifier head .*recipe=causal"):
        build(cfg)
    check_tuner_trains_head(tuner_config(compose(["tuner=ia3"])), compose(["tuner=ia3"]))  # has modules_to_save
    # the causal LM recipe builds it (a tiny GPT-2 with the MiniLM tokenizer: [CLS] / [SEP] rows)
    parts = build(compose(["recipe=causal_lm", "tuner=trainable_tokens"]))
    model = lp.get_peft_model(parts["model"], parts["tuner"])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "base_model.model.transformer.wte.trainable_tokens_delta.default"
    ]


@pytest.mark.parity("LORA")
def test_lora_trainable_tokens_reach_every_path_to_an_aliased_embedding_as_hf(tmp_path):
    """T5 after resize_token_embeddings: encoder.embed_tokens and decoder.embed_tokens ARE model.shared (one module,
    three paths); before, only `shared` got the rows and the encoder / decoder ran the old ones."""
    base = _base("t5")
    assert base.encoder.embed_tokens is base.shared
    kwargs = dict(r=2, target_modules=["q"], trainable_token_indices=NEW)
    hf = quiet(peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(**kwargs))
    _shift_rows(hf)
    hf.save_pretrained(tmp_path)
    ours = lp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert isinstance(ours.get_base_model().encoder.embed_tokens, TrainableTokensLayer)
    torch.testing.assert_close(_logits(ours), _logits(hf))
