"""Mixed-adapter batches (`adapter_names=[...]`, one adapter per sample, "__base__" for the base model) against HF
peft on the same weights: LoRA on Linear + Embedding (Llama), Conv1D (GPT-2), Conv2d, saved modules (BERT head) and
an encoder-decoder with beams (T5); forward and generate(); HF's refusals with its exception types; no state left
behind by a call that fails half-way."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from helpers import tiny_bert_classifier, tiny_convnet, tiny_gpt2, tiny_llama, tiny_t5

import lightning_peft as lp
from lightning_peft.tuners.base import ModulesToSaveWrapper
from lightning_peft.tuners.lora.layer import Linear, LoraLayer

NAMES = ["b", "__base__", "default", "b"]


def both(base, configs):
    """(HF peft's, ours) on copies of `base`: adapters from `configs(lib)` = [config, (name, config), ...], random
    non-zero LoRA weights (init_lora_weights=False) and saved-module copies, ours loaded with HF's state dict."""
    models = []
    for lib in (peft, lp):
        first, *more = configs(lib)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(copy.deepcopy(base), first)
            for name, config in more:
                model.add_adapter(name, config)
        models.append(model.eval())
    theirs, ours = models
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if ".modules_to_save." in n:
                p.add_(torch.randn(p.shape, generator=gen))
    assert not ours.load_state_dict(theirs.state_dict(), strict=False).unexpected_keys
    return theirs, ours


def token_batch(rows: int = 4, length: int = 7, seed: int = 2) -> torch.Tensor:
    return torch.randint(2, 64, (rows, length), generator=torch.Generator().manual_seed(seed))


def run(model, x, **kwargs):
    with torch.no_grad():
        out = model(**x, **kwargs) if isinstance(x, dict) else model(x, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.logits


def per_sample(model, x, names):
    """What the mixed batch must give: each sample alone, through its adapter (or with the adapters disabled)."""
    rows = []
    active = model.active_adapter
    for i, name in enumerate(names):
        sample = {k: v[i : i + 1] for k, v in x.items()} if isinstance(x, dict) else x[i : i + 1]
        if name == "__base__":
            with model.disable_adapter():
                rows.append(run(model, sample))
        else:
            model.set_adapter(name)
            rows.append(run(model, sample))
    model.set_adapter(active)
    return torch.cat(rows)


def lora(lib, **kwargs):
    return lib.LoraConfig(init_lora_weights=False, **kwargs)


@pytest.fixture(scope="module")
def llama():
    """Linear + Embedding; adapter "b" targets other layers than "default"."""
    return both(
        tiny_llama(),
        lambda lib: [
            lora(lib, target_modules=["q_proj", "v_proj", "embed_tokens"], task_type="CAUSAL_LM"),
            ("b", lora(lib, target_modules=["q_proj", "o_proj", "embed_tokens"], r=4, lora_alpha=16)),
        ],
    )


@pytest.fixture(scope="module")
def gpt2():
    return both(
        tiny_gpt2(),
        lambda lib: [
            lora(lib, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, task_type="CAUSAL_LM"),
            ("b", lora(lib, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
        ],
    )


@pytest.mark.parity("LORA")
@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_forward_equals_peft_and_each_sample_alone(which, request):
    theirs, ours = request.getfixturevalue(which)
    x = {"input_ids": token_batch()}
    expected = run(theirs, x, adapter_names=NAMES)
    got = run(ours, x, adapter_names=NAMES)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, per_sample(ours, x, NAMES), atol=1e-5, rtol=0)
    assert not torch.allclose(got[0], got[1], atol=1e-3) and not torch.allclose(got[2], got[3], atol=1e-3)
    # adapter_names=None is no request; the normal forward is unchanged by a mixed call before it
    torch.testing.assert_close(run(ours, x, adapter_names=None), run(theirs, x), atol=1e-5, rtol=0)


def greedy_per_sample(model, x, names):
    """Greedy tokens of each sample through its adapter alone."""
    rows = []
    for i, name in enumerate(names):
        kwargs = dict(input_ids=x[i : i + 1], attention_mask=torch.ones_like(x[i : i + 1]), max_new_tokens=4)
        if name == "__base__":
            with model.disable_adapter():
                rows.append(model.generate(do_sample=False, **kwargs))
        else:
            model.set_adapter(name)
            rows.append(model.generate(do_sample=False, **kwargs))
    model.set_adapter("default")
    return torch.cat(rows)


@pytest.mark.parity("LORA")
@pytest.mark.parametrize("options", [{}, {"num_beams": 2}, {"do_sample": True, "top_k": 1, "num_return_sequences": 2}])
def test_generate_equals_peft(gpt2, options):
    theirs, ours = gpt2
    x = token_batch(3, 5)
    names = ["__base__", "b", "default"]
    kwargs = dict(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=4, **options)
    got = ours.generate(adapter_names=names, **kwargs)
    if options.get("num_return_sequences"):
        # top_k=1 samples greedily; each sample is expanded to 2 rows, which HF peft 0.21 does not follow (it fails
        # with "Length of `adapter_names` ...", and leaves its hooks on the model)
        assert torch.equal(got, greedy_per_sample(ours, x, names).repeat_interleave(2, dim=0))
        return
    assert torch.equal(got, theirs.generate(adapter_names=names, **kwargs))
    if not options:
        assert torch.equal(got, greedy_per_sample(ours, x, names))


@pytest.mark.parity("LORA")
def test_seq2seq_generate_with_beams_equals_peft():
    """The encoder runs on the batch as given, the decoder on num_beams rows per sample."""
    theirs, ours = both(
        tiny_t5(),
        lambda lib: [
            lora(lib, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"),
            ("b", lora(lib, target_modules=["k", "o"])),
        ],
    )
    x = token_batch(3, 6)
    names = ["b", "__base__", "default"]
    for options in ({}, {"num_beams": 3}):
        kwargs = dict(input_ids=x, adapter_names=names, max_new_tokens=4, do_sample=False, **options)
        assert torch.equal(ours.generate(**kwargs), theirs.generate(**kwargs))


@pytest.mark.parity("LORA")
def test_conv2d_and_saved_modules_equal_peft():
    theirs, ours = both(
        tiny_convnet(),
        lambda lib: [
            lora(lib, target_modules=["conv1", "conv2"]),
            ("b", lora(lib, target_modules=["conv1"], modules_to_save=["head"])),
        ],
    )
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    got = run(ours, x, adapter_names=NAMES)
    torch.testing.assert_close(got, per_sample(ours, x, NAMES), atol=1e-5, rtol=0)
    # "default" saves no copy of the head: its samples run the original (as its own forward does); HF peft 0.21
    # fails with a KeyError there
    with pytest.raises(KeyError):
        run(theirs, x, adapter_names=NAMES)
    names = ["b", "__base__", "b", "b"]
    torch.testing.assert_close(
        run(ours, x, adapter_names=names), run(theirs, x, adapter_names=names), atol=1e-5, rtol=0
    )
    # a classifier head saved per adapter (task wrapper), each sample through its adapter's copy
    theirs, ours = both(
        tiny_bert_classifier(),
        lambda lib: [
            lora(lib, target_modules=["query"], task_type="SEQ_CLS"),
            ("b", lora(lib, target_modules=["value"], task_type="SEQ_CLS")),
        ],
    )
    x = {"input_ids": token_batch()}
    got = run(ours, x, adapter_names=NAMES)
    torch.testing.assert_close(got, run(theirs, x, adapter_names=NAMES), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, per_sample(ours, x, NAMES), atol=1e-5, rtol=0)


def test_layer_takes_adapter_names_itself(llama):
    _, ours = llama
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(4, 3, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = layer(x, adapter_names=NAMES)
        for i, name in enumerate(NAMES):
            expected = layer.base_layer(x[i])
            if name != "__base__":
                expected = expected + layer.lora_B[name](layer.lora_A[name](x[i])) * layer.scaling[name]
            torch.testing.assert_close(got[i], expected, atol=1e-6, rtol=0)


@pytest.mark.parity("LORA")
def test_refused_as_peft_refuses():
    """Same exception type as HF peft for the same mistake; nothing is left behind."""
    theirs, ours = both(
        tiny_gpt2(),
        lambda lib: [
            lora(lib, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"),
            ("b", lora(lib, target_modules=["c_attn"], fan_in_fan_out=True)),
        ],
    )
    x = {"input_ids": token_batch(2, 5)}
    plain = run(ours, x)
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        run(theirs, x, adapter_names=["default"])
    # HF peft 0.21 leaves its forward hooks behind when a layer refuses: its next plain forward still uses the names
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        run(theirs, x)
    cases = [
        (["default"], "Length of `adapter_names`"),
        (["default", "nope"], "non-existing adapter"),
        (["default", "b", "b"], "Length of `adapter_names`"),
    ]
    for names, match in cases:
        with pytest.raises(ValueError, match=match):
            run(ours, x, adapter_names=names)
        torch.testing.assert_close(run(ours, x), plain, atol=0, rtol=0)
    theirs, ours = both(  # HF's model again, without the hooks it left behind
        tiny_gpt2(),
        lambda lib: [
            lora(lib, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"),
            ("b", lora(lib, target_modules=["c_attn"], fan_in_fan_out=True)),
        ],
    )
    with pytest.raises(ValueError, match="non-existing adapter"):
        run(theirs, x, adapter_names=["default", "nope"])
    for model in (theirs, ours):
        # (switch the state on, the refusal, switch it back off)
        for enter, match, leave in (
            (model.train, "training mode", model.eval),
            (model.merge_adapter, "merged adapters", model.unmerge_adapter),
        ):
            enter()
            try:
                with pytest.raises(ValueError, match=match):
                    run(model, x, adapter_names=["default", "b"])
            finally:
                leave()
    with pytest.raises(TypeError, match="list of str"):  # HF reads a string letter by letter
        run(ours, x, adapter_names="default")
    with pytest.raises(ValueError, match="Length of `adapter_names`"):  # through generate() too
        ours.generate(**x, adapter_names=["b"], max_new_tokens=2)
    assert all(m._mixed_batch is None for m in ours.modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper)))


def test_other_tuners_refuse_adapter_names():
    """HF peft ignores adapter_names for IA3 and for prompt learning's forward (every sample runs the active
    adapter) and refuses it in prompt learning's generate() (ValueError): refused here for all of them."""
    x = token_batch(2, 5)
    for config in (
        lp.IA3Config(target_modules=["c_attn"], feedforward_modules=[], fan_in_fan_out=True, task_type="CAUSAL_LM"),
        lp.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"),
    ):
        model = lp.get_peft_model(tiny_gpt2(), config).eval()
        for call in (model, model.generate):
            with pytest.raises(ValueError, match="LoRA adapters only"):
                call(input_ids=x, adapter_names=["default", "__base__"])
        run(model, {"input_ids": x}, adapter_names=None)  # None is no request


def test_disabled_adapters_give_the_base_output(gpt2):
    theirs, ours = gpt2
    x = {"input_ids": token_batch()}
    with ours.disable_adapter(), theirs.disable_adapter():
        torch.testing.assert_close(
            run(ours, x, adapter_names=NAMES), run(theirs, x, adapter_names=NAMES), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(run(ours, x, adapter_names=NAMES), run(ours, x), atol=0, rtol=0)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failure_mid_forward_leaves_no_state(gpt2, error):
    """The names are the layers' only for the call: an exception half-way through takes them back, and the next
    forward (with or without names) is as before; the fused single-adapter path is taken again."""
    _, ours = gpt2
    x = {"input_ids": token_batch()}
    mixed, plain = run(ours, x, adapter_names=NAMES), run(ours, x)
    block = ours.base_model.model.transformer.h[1]

    def fail(*_):
        raise error("stop")

    handle = block.register_forward_pre_hook(fail)
    try:
        with pytest.raises(error, match="stop"):
            run(ours, x, adapter_names=NAMES)
    finally:
        handle.remove()
    layers = [m for m in ours.modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper))]
    assert layers and all(m._mixed_batch is None for m in layers)
    assert all(
        m._fused_inputs(torch.zeros(1, 32)) is not None for m in layers if type(m) is Linear and "default" in m.lora_A
    )
    torch.testing.assert_close(run(ours, x), plain, atol=0, rtol=0)
    torch.testing.assert_close(run(ours, x, adapter_names=NAMES), mixed, atol=0, rtol=0)
