"""LoRA initialisations that read the base weight (tuners/lora/init.py): PiSSA, fast PiSSA, OLoRA, LoftQ, gaussian.
Against HF `peft` 0.21 on the same seeded weights (creation, files both ways, the rank-2r conversion of
`save_pretrained(path_initial_model_for_weight_conversion=...)`), and their refusals."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from helpers import ids, logits, perturb, quiet, saved_shapes, snapshot, tiny_convnet, tiny_gpt2, tiny_llama, unchanged

import lightning_peft as lp
from lightning_peft.tuners.lora import init as lora_init

TARGETS = ["q_proj", "v_proj", "down_proj"]  # 32x32, 16x32, 32x64


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def build(lib, base, seed=5, **kwargs):
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **kwargs}
    torch.manual_seed(seed)  # the same random draws (kaiming of the factors, svd_lowrank's test matrix)
    return quiet(lib.get_peft_model, copy.deepcopy(base), getattr(lib, "LoraConfig")(**kwargs)).eval()


def states_equal(ours, theirs, atol=0.0):
    mine, hf = ours.state_dict(), theirs.state_dict()
    assert sorted(mine) == sorted(hf)
    for key in hf:
        torch.testing.assert_close(mine[key], hf[key], atol=atol, rtol=0, msg=key)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora", "gaussian", "Gaussian", "OLoRA"])
def test_creation_equals_hf(llama, init):
    ours, theirs = build(lp, llama, init_lora_weights=init), build(peft, llama, init_lora_weights=init)
    states_equal(ours, theirs)  # factors and the residual base weights, bit for bit
    # factors and residual weights are equal bit for bit (above); the forward is not HF's op order (fused path)
    torch.testing.assert_close(logits(ours, ids()), logits(theirs, ids()), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(ours, ids()), logits(llama, ids()), atol=2e-6, rtol=0)  # output kept
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    changed = not torch.equal(layer.base_layer.weight, llama.model.layers[0].self_attn.q_proj.weight)
    assert changed == (init.lower() != "gaussian")  # PiSSA / OLoRA leave W - s B A in the base
    assert ours.peft_config["default"].init_lora_weights == init


def test_gpt2_conv1d(tmp_path):
    """Conv1D (stored (in, out)): PiSSA equals HF; OLoRA is right here, where HF PEFT ignores fan_in_fan_out and
    fails (non-square c_attn) or changes the output (square c_proj)."""
    base = tiny_gpt2()
    kw = dict(target_modules=["c_attn", "c_proj"], r=4, lora_alpha=8)
    ours, theirs = build(lp, base, init_lora_weights="pissa", **kw), build(peft, base, init_lora_weights="pissa", **kw)
    states_equal(ours, theirs)
    olora = build(lp, base, init_lora_weights="olora", **kw)
    torch.testing.assert_close(logits(olora, ids()), logits(base, ids()), atol=2e-6, rtol=0)
    with pytest.raises(RuntimeError):
        logits(build(peft, base, init_lora_weights="olora", **kw), ids())
    perturb(olora)  # and it loads back onto the original base (the init runs again there)
    olora.save_pretrained(tmp_path)
    back = lp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(back, ids()), logits(olora, ids()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_files_both_ways_onto_the_original_base(llama, tmp_path, init):
    """Saved as is, the adapter applies to the ORIGINAL base: loading runs the initialisation again."""
    for writer, reader, folder in ((peft, lp, tmp_path / "hf"), (lp, peft, tmp_path / "ours")):
        written = build(writer, llama, init_lora_weights=init)
        perturb(written)
        written.save_pretrained(folder)
        assert json.loads((folder / "adapter_config.json").read_text())["init_lora_weights"] == init
        read = quiet(reader.PeftModel.from_pretrained, copy.deepcopy(llama), folder)
        torch.testing.assert_close(logits(read, ids()), logits(written, ids()), atol=1e-5, rtol=0)
    assert saved_shapes(tmp_path / "hf") == saved_shapes(tmp_path / "ours")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conversion_to_plain_lora_both_ways(llama, tmp_path, init):
    """HF PEFT's recipe: save the initial adapter with init_lora_weights=True, train, save with
    path_initial_model_for_weight_conversion: a rank-2r LoRA adapter for the original base, read by either."""
    results = {}
    for name, writer, reader in (("hf", peft, lp), ("ours", lp, peft)):
        model = build(writer, llama, init_lora_weights=init)
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(tmp_path / name / "init")
        model.peft_config["default"].init_lora_weights = init
        perturb(model)
        quiet(
            model.save_pretrained,
            tmp_path / name / "ft",
            path_initial_model_for_weight_conversion=tmp_path / name / "init",
        )
        saved = json.loads((tmp_path / name / "ft" / "adapter_config.json").read_text())
        assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)
        assert model.peft_config["default"].r == 4  # the model's own config is untouched
        read = quiet(reader.PeftModel.from_pretrained, copy.deepcopy(llama), tmp_path / name / "ft")
        torch.testing.assert_close(logits(read, ids()), logits(model, ids()), atol=1e-5, rtol=0)
        results[name] = saved_shapes(tmp_path / name / "ft")
    assert results["hf"] == results["ours"]
    assert all(shape[0] == 8 for k, shape in results["ours"].items() if "lora_A" in k)


def test_conversion_refusals(llama, tmp_path):
    model = build(lp, llama, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="is not a folder"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "missing")
    other = build(lp, llama, init_lora_weights="pissa", r=2)
    other.save_pretrained(tmp_path / "r2")
    with pytest.raises(ValueError, match="of shape"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "r2")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_conversion_refused_with_rslora_and_rank_pattern(llama, tmp_path):
    """Refused by both (the doubled ranks would not keep the scaling)."""
    kw = dict(init_lora_weights="pissa", use_rslora=True, rank_pattern={"q_proj": 2})
    build(lp, llama, init_lora_weights="pissa").save_pretrained(tmp_path / "init")
    for lib in (peft, lp):
        rs = build(lib, llama, **kw)
        with pytest.raises(ValueError, match="use_rslora=True"):
            rs.save_pretrained(tmp_path / "rs", path_initial_model_for_weight_conversion=str(tmp_path / "init"))


def test_merge_unmerge_unload(llama):
    ours, theirs = build(lp, llama, init_lora_weights="pissa"), build(peft, llama, init_lora_weights="pissa")
    perturb(ours), perturb(theirs)
    expected = logits(ours, ids())
    residual = {k: v.clone() for k, v in ours.state_dict().items() if "base_layer" in k}
    ours.merge_adapter()
    torch.testing.assert_close(logits(ours, ids()), expected, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    for key, value in residual.items():  # back to the residual (not the original) base
        torch.testing.assert_close(ours.state_dict()[key], value, atol=1e-6, rtol=0)
    with ours.disable_adapter(), theirs.disable_adapter():  # the residual model alone, as HF PEFT
        torch.testing.assert_close(logits(ours, ids()), logits(theirs, ids()), atol=1e-6, rtol=0)
    merged = copy.deepcopy(ours).merge_and_unload()
    torch.testing.assert_close(logits(merged, ids()), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        logits(ours.unload(), ids()), logits(theirs.unload(), ids()), atol=1e-6, rtol=0
    )  # unload() gives the residual model (HF PEFT's "residual model" to save)


def test_second_pissa_adapter_equals_hf(llama):
    models = []
    for lib in (lp, peft):
        model = build(lib, llama, init_lora_weights="pissa")
        torch.manual_seed(6)
        quiet(
            model.add_adapter,
            "second",
            getattr(lib, "LoraConfig")(r=2, target_modules=["q_proj"], init_lora_weights="pissa"),
        )
        models.append(model)
    states_equal(*models)
    models[0].set_adapter("second"), models[1].set_adapter("second")
    torch.testing.assert_close(logits(models[0], ids()), logits(models[1], ids()), atol=1e-6, rtol=0)


def test_bf16_base_computes_in_fp32(llama):
    base = copy.deepcopy(llama).to(torch.bfloat16)
    ours, theirs = build(lp, base, init_lora_weights="pissa"), build(peft, base, init_lora_weights="pissa")
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    hf_layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.base_layer.weight, hf_layer.base_layer.weight, atol=0, rtol=0)
    # HF PEFT rounds the factors through bf16 on their way to fp32; here they keep the fp32 SVD
    torch.testing.assert_close(layer.lora_A["default"].weight, hf_layer.lora_A["default"].weight, atol=0, rtol=1e-2)
    torch.testing.assert_close(logits(ours, ids()), logits(base, ids()), atol=0.05, rtol=0)


def test_embedding_falls_back_and_conv2d_is_refused(tmp_path):
    base = tiny_gpt2()
    ours = build(lp, base, init_lora_weights="pissa", target_modules=["wte"])
    theirs = build(peft, base, init_lora_weights="pissa", target_modules=["wte"])
    states_equal(ours, theirs)  # A zero, B normal: the embedding's default start, as HF PEFT
    conv = tiny_convnet()
    before = snapshot(conv)
    with pytest.raises(ValueError, match="Linear and Conv1D layers only"):
        lp.get_peft_model(conv, lp.LoraConfig(target_modules=["head", "conv1"], r=2, init_lora_weights="pissa"))
    assert unchanged(conv, before)  # the head's weight was not turned into a residual either
    with pytest.raises(ValueError, match="Unknown initialization"):
        quiet(
            peft.get_peft_model,
            tiny_convnet(),
            peft.LoraConfig(target_modules=["conv1"], r=2, init_lora_weights="pissa"),
        )
    with pytest.raises(TypeError, match="Linear and Conv1D layers only"):
        lp.get_peft_model(
            conv,
            lp.LoraConfig(
                target_modules=["conv1"],
                r=2,
                init_lora_weights="loftq",
                loftq_config={"loftq_bits": 4, "loftq_iter": 1},
            ),
        )
    assert unchanged(conv, before)


def test_refusals_like_hf(llama):
    for init, match in (
        ("pissa_niter_abc", "non-negative integer"),
        ("pissa_x", "'pissa' or 'pissa_niter_"),
        ("pissa_niter_-1", "non-negative"),
    ):
        with pytest.raises(ValueError, match=match):
            lp.LoraConfig(init_lora_weights=init)
    with pytest.raises(ValueError):  # HF PEFT: at get_peft_model
        build(peft, llama, init_lora_weights="pissa_niter_abc")
    for lib in (lp, peft):
        with pytest.raises(ValueError, match="loftq_config` must be specified|loftq_config must be specified"):
            lib.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="loftq_bits"):
        lp.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 3})
    with pytest.raises(ValueError, match="loftq_iter"):
        lp.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_iter": 0})
    with pytest.raises(ValueError, match="unknown keys"):
        lp.LoraConfig(init_lora_weights="loftq", loftq_config={"bits": 4})
    with pytest.raises(ValueError, match="not valid"):
        lp.LoraConfig(init_lora_weights="svd")
    # r above the layer's rank: HF PEFT silently builds factors of another shape than r; refused here, untouched
    model = copy.deepcopy(llama)
    before = snapshot(model)
    with pytest.raises(ValueError, match="r=20 is larger than .*v_proj"):
        lp.get_peft_model(model, lp.LoraConfig(r=20, target_modules=TARGETS, init_lora_weights="olora"))
    assert unchanged(model, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = lp.LoraConfig(init_lora_weights="loftq", loftq_config=lp.LoftQConfig())
    assert config.loftq_config == {"loftq_bits": 4, "loftq_iter": 1}
    with pytest.warns(UserWarning, match="loftq_config is set but ignored"):
        assert lp.LoraConfig(loftq_config={"loftq_bits": 4}).loftq_config == {}


def test_int8_base_refused():
    pytest.importorskip("bitsandbytes")
    from lightning_peft.quantization import quantize_base_linears

    model = tiny_llama()
    quiet(quantize_base_linears, model)
    before = snapshot(model)
    with pytest.raises(TypeError, match="needs a float base weight"):
        lp.get_peft_model(model, lp.LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa"))
    assert unchanged(model, before)


# ---- LoftQ ------------------------------------------------------------------------------------------------
def test_quantisers_equal_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
    torch.testing.assert_close(
        lora_init.nf4_roundtrip(weight), bnb.functional.dequantize_4bit(packed, state), atol=0, rtol=0
    )
    codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.clone())
    torch.testing.assert_close(
        lora_init.int8_roundtrip(weight), bnb.functional.int8_vectorwise_dequant(codes, scales), atol=0, rtol=0
    )


@pytest.mark.parametrize("bits,iters", [(4, 1), (4, 2), (8, 1)])
def test_loftq_equals_hf_math(llama, bits, iters, tmp_path):
    """HF PEFT's loftq_init runs on CUDA only; its steps (utils/loftq_utils.py) on CPU with bitsandbytes' own
    quantisers are the reference here."""
    pytest.importorskip("bitsandbytes")
    from peft.utils.loftq_utils import _low_rank_decomposition

    loftq = {"loftq_bits": bits, "loftq_iter": iters}
    with pytest.warns(UserWarning, match="without the scaling"):
        lp.LoraConfig(r=4, lora_alpha=8, init_lora_weights="loftq", loftq_config=loftq)
    ours = build(lp, llama, init_lora_weights="loftq", loftq_config=loftq, lora_alpha=4)
    layer = ours.base_model.model.model.layers[1].mlp.down_proj
    weight = llama.model.layers[1].mlp.down_proj.weight.float()
    remainder = weight.clone()
    for i in range(iters):
        dequantised = lora_init.nf4_roundtrip(remainder) if bits == 4 else lora_init.int8_roundtrip(remainder)
        out = _low_rank_decomposition(weight - dequantised, reduced_rank=4)
        if i + 1 < iters:
            remainder = weight - out["L"] @ out["R"]
    torch.testing.assert_close(layer.base_layer.weight, dequantised, atol=0, rtol=0)
    torch.testing.assert_close(layer.lora_A["default"].weight, out["R"], atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.lora_B["default"].weight, out["L"], atol=1e-6, rtol=0)
    error = (layer.base_layer.weight + layer.get_delta_weight("default") - weight).norm()
    assert error < (dequantised - weight).norm()  # the adapter takes back part of the quantisation error
    # saved as is, it loads onto the original base (quantised again there); HF PEFT's file of it reads too
    perturb(ours)
    ours.save_pretrained(tmp_path)
    hf_config = peft.LoraConfig.from_pretrained(tmp_path)
    assert hf_config.loftq_config == {"loftq_bits": bits, "loftq_iter": iters}
    back = lp.PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path)
    torch.testing.assert_close(logits(back, ids()), logits(ours, ids()), atol=1e-5, rtol=0)
    quiet(
        peft.LoraConfig(
            init_lora_weights="loftq", loftq_config=peft.LoftQConfig(bits, iters), target_modules=TARGETS, r=4
        ).save_pretrained,
        tmp_path / "hf",
    )
    assert lp.LoraConfig.from_pretrained(tmp_path / "hf").loftq_config == {"loftq_bits": bits, "loftq_iter": iters}


def test_lightning_exports_of_a_pissa_adapter(tmp_path):
    """PEFTCallback: merged/ is the residual base plus the trained update (the fitted model's outputs), adapter/
    (saved with init_lora_weights='pissa') loads onto the original base, as HF PEFT reads it too."""
    import lightning.pytorch as pl
    from helpers import quiet_trainer, token_loader
    from transformers import LlamaForCausalLM

    from lightning_peft.lightning import PEFTCallback

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_llama()

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)

    module = Lit()
    callback = PEFTCallback(
        lp.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa"), export_dir=str(tmp_path)
    )
    quiet(quiet_trainer(callbacks=[callback], max_steps=2).fit, module, token_loader(rows=4))
    expected = logits(module.model.eval(), ids())
    assert not torch.allclose(expected, logits(tiny_llama(), ids()), atol=1e-3)  # it trained
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged, ids()), expected, atol=1e-5, rtol=0)
    for lib in (lp, peft):
        back = quiet(lib.PeftModel.from_pretrained, tiny_llama(), tmp_path / "adapter")
        torch.testing.assert_close(logits(back, ids()), expected, atol=1e-5, rtol=0)
