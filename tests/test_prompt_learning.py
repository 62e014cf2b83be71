"""Prompt tuning, P-tuning and prefix tuning against the installed HF `peft` on tiny GPT-2, Llama (GQA), T5 and
BERT: same weights -> same logits, files both ways, greedy generate(), BERT prefix vs a hand-computed reference."""

from __future__ import annotations

import math
import warnings

import peft
import pytest
import torch
from helpers import ids, logits, perturb, quiet, saved_shapes, tiny_bert_classifier, tiny_gpt2, tiny_llama, tiny_t5
from safetensors.torch import load_file

import lightning_peft as lp

ATOL = 1e-4
VT = 3

TASKS = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": "SEQ_CLS"}
FACTORIES = {"gpt2": tiny_gpt2, "llama": tiny_llama, "t5": tiny_t5, "bert": tiny_bert_classifier}
METHODS = {
    "prompt": ("PromptTuningConfig", {}),
    "ptuning-mlp": ("PromptEncoderConfig", dict(encoder_hidden_size=24)),
    "ptuning-lstm": ("PromptEncoderConfig", dict(encoder_reparameterization_type="LSTM", encoder_hidden_size=12)),
    "prefix": ("PrefixTuningConfig", {}),
    "prefix-proj": ("PrefixTuningConfig", dict(prefix_projection=True, encoder_hidden_size=24)),
}
# every method x model pair HF peft supports (peft cannot run prefix tuning on BERT classifiers: tested below)
PAIRS = [(k, m) for k in TASKS for m in METHODS if not (k == "bert" and m.startswith("prefix"))]


def _config(lib, method: str, task: str, **extra):
    name, kwargs = METHODS[method]
    return getattr(lib, name)(task_type=task, num_virtual_tokens=VT, **kwargs, **extra)


def _inputs(kind: str) -> dict:
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second row
    out = dict(input_ids=ids, attention_mask=mask)
    if kind == "t5":
        out["labels"] = torch.randint(1, 64, (2, 4), generator=torch.Generator().manual_seed(2))
    return out


def _lively_t5():
    """The tiny T5 from its config greedily emits only token 0; noisier weights make decoding informative."""
    model = tiny_t5()
    perturb(model, seed=4, scale=0.3, trainable_only=False)
    return model


def _pair(kind: str, method: str, seed: int = 5, factory=None):
    """(peft model, our model) on identical base weights, ours given peft's encoder (and head) weights."""
    task, factory = TASKS[kind], factory or FACTORIES[kind]
    torch.manual_seed(seed)
    theirs = quiet(peft.get_peft_model, factory(), _config(peft, method, task)).eval()
    ours = quiet(lp.get_peft_model, factory(), _config(lp, method, task)).eval()
    # the factories reseed the global RNG, so both start equal: move peft's weights away from that start
    perturb(theirs, seed=seed, scale=0.5)
    ours.prompt_encoder.load_state_dict(theirs.prompt_encoder.state_dict())
    if kind == "bert":
        ours.base_model.classifier.load_state_dict(theirs.base_model.classifier.state_dict())
    return theirs, ours


@pytest.mark.parametrize("kind,method", PAIRS)
def test_same_weights_samelogits(kind, method):
    theirs, ours = _pair(kind, method)
    inputs = _inputs(kind)
    expected = logits(theirs, inputs)
    torch.testing.assert_close(logits(ours, inputs), expected, atol=ATOL, rtol=0)
    # the prompt matters: a different encoder gives different numbers
    base = FACTORIES[kind]()
    torch.manual_seed(11)
    other = quiet(lp.get_peft_model, base, _config(lp, method, TASKS[kind])).eval()
    assert (logits(other, inputs) - expected).abs().max() > 10 * ATOL


@pytest.mark.parametrize("kind,method", PAIRS)
def test_peft_files_load_in_ours(kind, method, tmp_path):
    theirs, _ = _pair(kind, method)
    theirs.save_pretrained(tmp_path)
    ours = quiet(lp.PeftModel.from_pretrained, FACTORIES[kind](), tmp_path).eval()
    inputs = _inputs(kind)
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=ATOL, rtol=0)
    encoder = ours.prompt_encoder["default"]
    assert not encoder.reparameterized  # a loaded P-tuning / projected prefix runs without its MLP
    assert [n for n, _ in encoder.named_parameters()] == ["embedding.weight"]
    assert not any(p.requires_grad for p in ours.parameters())


@pytest.mark.parity("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
@pytest.mark.parametrize("kind,method", PAIRS)
def test_our_files_load_in_peft_and_keys_match(kind, method, tmp_path):
    _, ours = _pair(kind, method)
    ours.save_pretrained(tmp_path / "ours")
    theirs = quiet(peft.PeftModel.from_pretrained, FACTORIES[kind](), tmp_path / "ours").eval()
    inputs = _inputs(kind)
    torch.testing.assert_close(logits(theirs, inputs), logits(ours, inputs), atol=ATOL, rtol=0)
    fresh = quiet(peft.get_peft_model, FACTORIES[kind](), _config(peft, method, TASKS[kind]))
    fresh.save_pretrained(tmp_path / "peft")
    assert saved_shapes(tmp_path / "ours") == saved_shapes(tmp_path / "peft") == SAVED[kind, method]


# the files' contents written out (VT = 3 virtual tokens). Every method saves one tensor, `prompt_embeddings`: the
# prompt (P-tuning: its encoder's output) as (virtual tokens, hidden), or for prefix tuning the keys and values of
# every layer (virtual tokens, layers x 2 x kv width); an encoder-decoder (T5) has a prompt for each of its two
# stacks, so twice the tokens; a classifier (BERT, SEQ_CLS) saves its head too.
_BERT_HEAD = {"base_model.classifier.weight": (3, 32), "base_model.classifier.bias": (3,)}
SAVED = {
    ("gpt2", "prompt"): {"prompt_embeddings": (3, 32)},
    ("gpt2", "ptuning-mlp"): {"prompt_embeddings": (3, 32)},
    ("gpt2", "ptuning-lstm"): {"prompt_embeddings": (3, 32)},
    ("gpt2", "prefix"): {"prompt_embeddings": (3, 128)},  # 2 layers x (k, v) x 32
    ("gpt2", "prefix-proj"): {"prompt_embeddings": (3, 128)},
    ("llama", "prompt"): {"prompt_embeddings": (3, 32)},
    ("llama", "ptuning-mlp"): {"prompt_embeddings": (3, 32)},
    ("llama", "ptuning-lstm"): {"prompt_embeddings": (3, 32)},
    ("llama", "prefix"): {"prompt_embeddings": (3, 64)},  # 2 layers x (k, v) x 2 kv heads x 8
    ("llama", "prefix-proj"): {"prompt_embeddings": (3, 64)},
    ("t5", "prompt"): {"prompt_embeddings": (6, 32)},
    ("t5", "ptuning-mlp"): {"prompt_embeddings": (6, 32)},
    ("t5", "ptuning-lstm"): {"prompt_embeddings": (6, 32)},
    ("t5", "prefix"): {"prompt_embeddings": (3, 128)},  # one prefix of 3 tokens: 2 layers x (k, v) x 32
    ("t5", "prefix-proj"): {"prompt_embeddings": (3, 128)},
    ("bert", "prompt"): {"prompt_embeddings": (3, 32), **_BERT_HEAD},
    ("bert", "ptuning-mlp"): {"prompt_embeddings": (3, 32), **_BERT_HEAD},
    ("bert", "ptuning-lstm"): {"prompt_embeddings": (3, 32), **_BERT_HEAD},
}


def test_saved_prompt_embeddings_are_the_encoder_output(tmp_path):
    _, ours = _pair("gpt2", "prefix-proj")
    ours.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"]
    encoder = ours.prompt_encoder["default"]
    with torch.no_grad():
        expected = encoder.transform(encoder.embedding.weight)
    assert saved.shape == (VT, 2 * 2 * 32)
    torch.testing.assert_close(saved, expected, atol=1e-6, rtol=0)


# ---- generate ---------------------------------------------------------------------------------
def _greedy_reference(model, kind: str, inputs: dict, steps: int, prefix: bool) -> torch.Tensor:
    """Greedy decoding by full forward passes (no cache) through the model's own forward()."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        if kind == "t5":
            dec = torch.zeros(ids.shape[0], 1, dtype=torch.long)
            for _ in range(steps):
                logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
                dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            return dec
        for _ in range(steps):
            extra = {}
            if prefix:  # generate() numbers tokens past left padding; forward() shifts them past the prefix
                extra["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, **extra).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return ids


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5"])
@pytest.mark.parametrize("method", ["prompt", "ptuning-mlp", "prefix", "prefix-proj"])
def test_greedy_generate(kind, method):
    theirs, ours = _pair(kind, method, factory=_lively_t5 if kind == "t5" else None)
    for model in (theirs, ours):
        model.get_base_model().generation_config.eos_token_id = None  # always 6 tokens
    inputs = {k: v for k, v in _inputs(kind).items() if k != "labels"}
    kwargs = dict(inputs, max_new_tokens=6, do_sample=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours.generate(**kwargs)
        assert torch.equal(ours.generate(**kwargs, use_cache=False), got)
        expected = _greedy_reference(ours, kind, inputs, 6, method.startswith("prefix"))
        assert torch.equal(got, expected)
        with ours.disable_adapter():
            assert not torch.equal(ours.generate(**kwargs), got)
        # peft 0.21 hands its prefix / prompt to generate() under the old `past_key_values` name, which
        # transformers 5 overrides with its own (empty) `cache`: its prefix generation runs without the prefix and
        # its cached causal decoding re-inserts the prompt at every step. Where it is right, it must agree with us.
        if not method.startswith("prefix"):
            assert torch.equal(theirs.generate(**kwargs, use_cache=False), got)
            if kind == "t5":
                assert torch.equal(theirs.generate(**kwargs), got)


# ---- BERT: prefix tuning where HF peft refuses -------------------------------------------------
def _prefix_layers(encoder, config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    heads, head_dim = config.num_attention_heads, config.token_dim // config.num_attention_heads
    flat = encoder(torch.arange(VT).unsqueeze(0))[0]  # (VT, layers * 2 * token_dim)
    per = flat.view(VT, config.num_layers * 2, heads, head_dim).permute(1, 2, 0, 3)  # (2L, H, VT, hd)
    return [(per[2 * i], per[2 * i + 1]) for i in range(config.num_layers)]


def _bert_with_prefix_by_hand(bert, layers_kv, ids, mask) -> torch.Tensor:
    """BERT's forward written out, each layer's keys/values preceded by the prefix's (positions continue after
    the prefix, as a BertModel given a cache numbers them)."""
    emb = bert.embeddings
    batch, length = ids.shape
    positions = torch.arange(VT, VT + length).unsqueeze(0)
    h = emb.LayerNorm(
        emb.word_embeddings(ids) + emb.position_embeddings(positions) + emb.token_type_embeddings(torch.zeros_like(ids))
    )
    full_mask = torch.cat([torch.ones(batch, VT), mask.float()], dim=1)
    additive = (1.0 - full_mask)[:, None, None, :] * torch.finfo(torch.float32).min
    for layer, (pk, pv) in zip(bert.encoder.layer, layers_kv):
        att = layer.attention.self
        heads, hd = att.num_attention_heads, att.attention_head_size

        def split(t):
            return t.view(batch, length, heads, hd).transpose(1, 2)

        q = split(att.query(h))
        k = torch.cat([pk.unsqueeze(0).expand(batch, -1, -1, -1), split(att.key(h))], dim=2)
        v = torch.cat([pv.unsqueeze(0).expand(batch, -1, -1, -1), split(att.value(h))], dim=2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + additive, dim=-1)
        ctx = (probs @ v).transpose(1, 2).reshape(batch, length, heads * hd)
        a = layer.attention.output.LayerNorm(layer.attention.output.dense(ctx) + h)
        h = layer.output.LayerNorm(layer.output.dense(layer.intermediate(a)) + a)
    return h


@pytest.mark.parametrize("method", ["prefix", "prefix-proj"])
def test_bert_classifier_prefix_matches_hand_reference(method, tmp_path):
    with pytest.raises(ValueError, match="does not support past key values"):  # what HF peft 0.21 does
        quiet(peft.get_peft_model, tiny_bert_classifier(), _config(peft, method, "SEQ_CLS"))(**_inputs("bert"))
    model = quiet(lp.get_peft_model, tiny_bert_classifier(), _config(lp, method, "SEQ_CLS")).eval()
    inputs = _inputs("bert")
    config = model.peft_config["default"]
    with torch.no_grad():
        got = model(**inputs).logits
        bert = model.base_model.bert
        hidden = _bert_with_prefix_by_hand(
            bert, _prefix_layers(model.prompt_encoder["default"], config), inputs["input_ids"], inputs["attention_mask"]
        )
        expected = model.base_model.classifier(bert.pooler(hidden))
        plain = model.get_base_model()(**inputs).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(got, plain, atol=1e-3)
    # and the saved adapter (projected prefix saved as its output) reloads to the same numbers
    model.save_pretrained(tmp_path)
    loaded = quiet(lp.PeftModel.from_pretrained, tiny_bert_classifier(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, inputs), got, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["prompt", "ptuning-mlp", "prefix"])
def test_bert_feature_extraction_matches_peft(method, tmp_path):
    from transformers import BertModel

    def backbone():
        return BertModel(tiny_bert_classifier().config, add_pooling_layer=False).eval()

    torch.manual_seed(7)
    base_state = backbone().state_dict()
    theirs_base, ours_base = backbone(), backbone()
    theirs_base.load_state_dict(base_state)
    ours_base.load_state_dict(base_state)
    theirs = quiet(peft.get_peft_model, theirs_base, _config(peft, method, "FEATURE_EXTRACTION")).eval()
    ours = quiet(lp.get_peft_model, ours_base, _config(lp, method, "FEATURE_EXTRACTION")).eval()
    ours.prompt_encoder.load_state_dict(theirs.prompt_encoder.state_dict())
    inputs = {k: v for k, v in _inputs("bert").items()}
    with torch.no_grad():
        expected = theirs(**inputs).last_hidden_state
        torch.testing.assert_close(ours(**inputs).last_hidden_state, expected, atol=ATOL, rtol=0)
    if method == "prefix":
        config = ours.peft_config["default"]
        with torch.no_grad():
            by_hand = _bert_with_prefix_by_hand(
                ours.base_model,
                _prefix_layers(ours.prompt_encoder["default"], config),
                inputs["input_ids"],
                inputs["attention_mask"],
            )
        torch.testing.assert_close(expected, by_hand, atol=ATOL, rtol=0)


# ---- training ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,method", [(k, m) for k in ("gpt2", "t5", "bert") for m in METHODS])
def test_training_reaches_only_the_prompt_parameters(kind, method):
    model = quiet(lp.get_peft_model, FACTORIES[kind](), _config(lp, method, TASKS[kind])).train()
    inputs = _inputs(kind)
    if kind == "gpt2":
        inputs["labels"] = inputs["input_ids"]
    elif kind == "bert":
        inputs["labels"] = torch.tensor([0, 2])
    out = model(**inputs)
    # GPT-2: one logit row per token, virtual ones included unless the prefix sits in the cache; T5: per label token
    # (the prompt only lengthens the encoder input); BERT: one logit per class
    expected = {"gpt2": 7 if method.startswith("prefix") else 7 + VT, "t5": 4, "bert": 3}[kind]
    assert out.logits.shape[1] == expected
    out.loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    allowed = ("prompt_encoder.default.", "base_model.classifier.modules_to_save.default.")
    assert trainable and all(n.startswith(allowed) for n in trainable), sorted(trainable)
    assert any(n.startswith("prompt_encoder.default.") for n in trainable)
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_only_the_active_prompt_adapter_trains(method):
    model = quiet(lp.get_peft_model, tiny_bert_classifier(), _config(lp, method, "SEQ_CLS"), adapter_name="a")
    # add_adapter (unlike the constructor) does not add the head itself: name it, so that both adapters have a copy
    quiet(model.add_adapter, "b", _config(lp, method, "SEQ_CLS", modules_to_save=["classifier"]))

    def trainable(name):
        return {n for n, p in model.named_parameters() if p.requires_grad and f".{name}." in n}

    def frozen_elsewhere():  # the base model (classifier original included) never trains
        return not any(p.requires_grad for n, p in model.named_parameters() if ".a." not in n and ".b." not in n)

    assert model.active_adapter == "a" and not trainable("b") and frozen_elsewhere()
    assert any(n.startswith("prompt_encoder.a.") for n in trainable("a"))
    assert any(n.startswith("base_model.classifier.modules_to_save.a.") for n in trainable("a"))
    model.set_adapter("b")
    assert not trainable("a") and frozen_elsewhere()
    assert any(n.startswith("prompt_encoder.b.") for n in trainable("b"))
    assert any(n.startswith("base_model.classifier.modules_to_save.b.") for n in trainable("b"))
    model.set_adapter("a")
    assert not trainable("b") and trainable("a")


def test_an_inference_mode_prompt_adapter_stays_frozen_when_set_active():
    model = quiet(lp.get_peft_model, tiny_bert_classifier(), _config(lp, "prompt", "SEQ_CLS"), adapter_name="a")
    quiet(model.add_adapter, "b", _config(lp, "prompt", "SEQ_CLS", inference_mode=True))
    model.set_adapter("b")
    assert not any(p.requires_grad for p in model.parameters())


def test_causal_labels_are_padded_for_the_virtual_tokens():
    model = quiet(lp.get_peft_model, tiny_gpt2(), _config(lp, "prompt", "CAUSAL_LM")).eval()
    ids = _inputs("gpt2")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        embeds = torch.cat([model.get_prompt(2), model.word_embeddings(ids)], dim=1)
        labels = torch.cat([torch.full((2, VT), -100), ids], dim=1)
        expected = model.get_base_model()(inputs_embeds=embeds, labels=labels)
    torch.testing.assert_close(out.loss, expected.loss)


def test_disable_adapter_runs_the_base_model():
    model = quiet(lp.get_peft_model, tiny_bert_classifier(), _config(lp, "prefix", "SEQ_CLS")).eval()
    inputs = _inputs("bert")
    with torch.no_grad():
        with model.disable_adapter():
            disabled = model(**inputs).logits
        plain = tiny_bert_classifier()(**inputs).logits
    torch.testing.assert_close(disabled, plain, atol=0, rtol=0)


def test_gqa_prefix_sizes_come_from_the_kv_heads():
    model = quiet(lp.get_peft_model, tiny_llama(), _config(lp, "prefix", "CAUSAL_LM"))
    config = model.peft_config["default"]
    assert (config.num_attention_heads, config.token_dim, config.num_layers) == (2, 16, 2)  # 2 kv heads x 8
    assert model.prompt_encoder["default"].embedding.weight.shape == (VT, 2 * 2 * 16)
    cache = model.get_prompt(batch_size=2)
    keys = cache.layers[0].keys
    assert tuple(keys.shape) == (2, 2, VT, 8)


def test_trainable_load_of_a_reparameterised_adapter_continues_on_its_output(tmp_path):
    theirs, _ = _pair("gpt2", "ptuning-lstm")
    theirs.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="holds the encoder's output only"):
        ours = lp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path, is_trainable=True)
    encoder = ours.prompt_encoder["default"]
    assert not encoder.reparameterized and encoder.embedding.weight.requires_grad
    inputs = _inputs("gpt2")
    torch.testing.assert_close(logits(ours.eval(), inputs), logits(theirs, inputs), atol=ATOL, rtol=0)


# ---- TEXT init ----------------------------------------------------------------------------------
def _local_tokenizer(folder) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "classify", "the", "sentiment", "of", "this", "review"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    return str(folder)


def test_text_init_copies_the_word_embeddings_of_the_text(tmp_path):
    path = _local_tokenizer(tmp_path / "tok")
    kwargs = dict(
        task_type="CAUSAL_LM",
        num_virtual_tokens=8,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="classify the sentiment",
        tokenizer_name_or_path=path,
    )
    ours = lp.get_peft_model(tiny_gpt2(), lp.PromptTuningConfig(**kwargs))
    theirs = quiet(peft.get_peft_model, tiny_gpt2(), peft.PromptTuningConfig(**kwargs))
    rows = ours.prompt_encoder["default"].embedding.weight
    expected = ours.word_embeddings.weight[torch.tensor([1, 2, 3, 1, 2, 3, 1, 2])]  # repeated, cut to 8
    torch.testing.assert_close(rows, expected, atol=0, rtol=0)
    torch.testing.assert_close(rows, theirs.prompt_encoder["default"].embedding.weight, atol=0, rtol=0)


# ---- errors -------------------------------------------------------------------------------------
def test_text_init_without_tokenizer_or_text_is_refused():
    with pytest.raises(ValueError, match="prompt_tuning_init='TEXT' needs tokenizer_name_or_path"):
        lp.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hello")
    with pytest.raises(ValueError, match="prompt_tuning_init='TEXT' needs prompt_tuning_init_text"):
        lp.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", tokenizer_name_or_path="/tmp/x")
    with pytest.raises(
        ValueError, match="prompt_tuning_init='bogus' is not valid; use one of: TEXT, SAMPLE_VOCAB, RANDOM"
    ):
        lp.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="bogus")


def test_missing_local_tokenizer_is_a_clear_error(tmp_path):
    config = lp.PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=4,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="hi",
        tokenizer_name_or_path=str(tmp_path / "none"),
    )
    with pytest.raises(ValueError, match="could not load the tokenizer at tokenizer_name_or_path"):
        lp.get_peft_model(tiny_gpt2(), config)


def test_prefix_tuning_with_gradient_checkpointing_is_refused():
    model = tiny_gpt2()
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="prefix tuning does not work with gradient checkpointing"):
        lp.get_peft_model(model, _config(lp, "prefix", "CAUSAL_LM"))
    peft_model = lp.get_peft_model(tiny_gpt2(), _config(lp, "prefix", "CAUSAL_LM"))
    peft_model.get_base_model().gradient_checkpointing_enable()  # switched on later: refused at forward
    with pytest.raises(ValueError, match="prefix tuning does not work with gradient checkpointing"):
        peft_model(**_inputs("gpt2"))


class _NoSizes(torch.nn.Module):
    """A model whose config lacks every size field."""

    def __init__(self) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(vocab_size=10)
        self.embed = torch.nn.Embedding(10, 8)

    def get_input_embeddings(self):
        return self.embed


def test_sizes_that_cannot_be_filled_are_named():
    with pytest.raises(
        ValueError,
        match=r"PromptTuningConfig.num_layers is None and cannot be filled .*"
        r"num_hidden_layers, num_layers, n_layer. Set num_layers",
    ):
        lp.get_peft_model(_NoSizes(), lp.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="num_virtual_tokens is None"):
        lp.get_peft_model(tiny_gpt2(), lp.PromptTuningConfig(task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="token_dim=16 but the model's input embeddings are 32 wide"):
        lp.get_peft_model(
            tiny_gpt2(), lp.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, token_dim=16)
        )
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        lp.PrefixTuningConfig(num_virtual_tokens=0)


def test_loading_a_file_of_the_wrong_shape_is_refused(tmp_path):
    lp.get_peft_model(tiny_gpt2(), _config(lp, "prompt", "CAUSAL_LM")).save_pretrained(tmp_path)
    wrong = lp.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    with pytest.raises(ValueError, match=r"shape mismatches: prompt_embeddings: file \(3, 32\) vs model \(5, 32\)"):
        lp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path, config=wrong)
    model = lp.get_peft_model(tiny_gpt2(), _config(lp, "prompt", "CAUSAL_LM"))
    with pytest.raises(ValueError, match=r"unexpected keys: base_model.classifier.weight"):
        lp.set_peft_model_state_dict(
            model,
            {"prompt_embeddings": torch.zeros(VT, 32), "base_model.classifier.weight": torch.zeros(2, 32)},
            "default",
        )


@pytest.mark.parity("PROMPT_TUNING")
def test_inputs_are_fed_as_the_first_adapters_task_and_attributes_come_from_the_base_as_in_peft():
    """HF PEFT picks the forward path by the PeftModel class (the first adapter's task type), so a second adapter
    of another task type runs the same way; attribute lookups go to the user's model first."""
    inputs = dict(input_ids=ids(), labels=ids())
    models = []
    for lib in (peft, lp):
        model = quiet(
            lib.get_peft_model, tiny_gpt2(), lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
        )
        quiet(model.add_adapter, "b", lib.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
        model.set_adapter("b")
        models.append(model.eval())
    theirs, ours = models
    ours.prompt_encoder["b"].load_state_dict(theirs.prompt_encoder["b"].state_dict())
    with torch.no_grad():
        expected, got = theirs(**inputs), ours(**inputs)
    torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
    assert ours.training is False and ours.tuner.training is False
    llamas = [
        quiet(lib.get_peft_model, tiny_llama(), lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
        for lib in (peft, lp)
    ]
    assert type(llamas[1].model) is type(llamas[0].model)  # LlamaForCausalLM.model (the LlamaModel), not the tuner's
