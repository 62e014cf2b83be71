"""DDP and FSDP2 on 2 CPU processes (gloo), end to end through Lightning's own launcher.

`tests/strategies_worker.py` trains a tiny GPT-2 with LoRA (+ modules_to_save), IA3 and prompt tuning:
a 4-step run, a 2-step run and its resume to step 4, and one fit of a module with two models and two PEFTCallbacks
(one exporting the best checkpoint's adapter), with DDP and then with FSDP2 (one pair of processes for both: each
start imports torch, transformers and Lightning again). Here we check what it left behind.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from helpers import run_forked
from safetensors.torch import load_file
from strategies_worker import STEPS, TWO, build_model, probe_ids, tuner_config

HERE = Path(__file__).resolve().parent
TUNERS = ("lora", "ia3", "prompt_tuning")


def _run_worker(strategy: str, out: Path) -> float:
    """Rank 0 forked from the preloaded fork server of tests/helpers.py (a new process without paying the imports
    again); Lightning's launcher starts rank 1 as a new interpreter running the worker script."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    start = time.perf_counter()
    proc = run_forked(
        [str(HERE / "strategies_worker.py"), "--strategy", strategy, "--out", str(out)],
        env=env,
        timeout=480,  # both strategies
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def worker_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("strategies")
    _run_worker("ddp,fsdp", out)
    return out


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def run(request, worker_out):
    return request.param, worker_out / request.param


def _single_process(tuner: str):
    from lightning_peft import get_peft_model

    torch.manual_seed(0)
    return get_peft_model(build_model(), tuner_config(tuner))


def _rank(out: Path, tuner: str, phase: str, rank: int) -> dict:
    return torch.load(out / tuner / phase / f"rank{rank}.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("tuner", TUNERS)
def test_export_has_exact_keys_and_is_identical_on_every_rank(run, tuner):
    from lightning_peft.serialization import get_peft_model_state_dict

    _, out = run
    expected = set(get_peft_model_state_dict(_single_process(tuner)))
    exported = load_file(out / tuner / "full" / "adapter" / "adapter_model.safetensors")
    assert set(exported) == expected
    if tuner == "lora":
        assert "base_model.model.transformer.ln_f.weight" in exported  # modules_to_save made it
    rank0, rank1 = _rank(out, tuner, "full", 0), _rank(out, tuner, "full", 1)
    assert set(rank0["adapter"]) == set(rank1["adapter"]) == expected
    for key, value in exported.items():
        assert value.shape == rank0["adapter"][key].shape  # full tensors, not shards
        torch.testing.assert_close(rank0["adapter"][key], value, rtol=0, atol=0)
        torch.testing.assert_close(rank1["adapter"][key], value, rtol=0, atol=0)
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["global_step"] == STEPS


@pytest.mark.slow
@pytest.mark.parametrize("tuner", TUNERS)
def test_adapter_trained_and_reloads_in_one_process_with_the_same_outputs(run, tuner):
    from lightning_peft import PeftModel
    from lightning_peft.serialization import get_peft_model_state_dict

    _, out = run
    adapter_dir = out / tuner / "full" / "adapter"
    initial = get_peft_model_state_dict(_single_process(tuner))
    exported = load_file(adapter_dir / "adapter_model.safetensors")
    assert any(not torch.equal(exported[k], initial[k]) for k in initial), "the adapter did not train"
    reloaded = PeftModel.from_pretrained(build_model(), str(adapter_dir))
    with torch.no_grad():
        logits = reloaded(input_ids=probe_ids()).logits
        base_logits = build_model()(input_ids=probe_ids()).logits
    for rank in (0, 1):  # the (sharded) training model on each rank, before any merge
        torch.testing.assert_close(logits, _rank(out, tuner, "full", rank)["logits"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits[:, -1], base_logits[:, -1], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("tuner", TUNERS)
def test_resume_from_checkpoint_continues_exactly(run, tuner):
    _, out = run
    full = load_file(out / tuner / "full" / "adapter" / "adapter_model.safetensors")
    part = load_file(out / tuner / "part" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(out / tuner / "resume" / "adapter" / "adapter_model.safetensors")
    assert _rank(out, tuner, "resume", 0)["global_step"] == STEPS
    for key in full:  # 2 + 2 steps (optimizer state restored) == 4 steps; 2 steps alone is not
        torch.testing.assert_close(resumed[key], full[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(part[k], full[k], atol=1e-6) for k in full)


@pytest.mark.slow
@pytest.mark.parametrize("tuner", TUNERS)
def test_checkpoint_holds_the_full_adapter_only(run, tuner):
    _, out = run
    checkpoint = torch.load(out / tuner / "part" / "ckpt" / "last.ckpt", weights_only=False)
    model = _single_process(tuner)
    expected = {
        f"model.{k}": v
        for k, v in model.state_dict().items()
        if k in {n for n, p in model.named_parameters() if p.requires_grad}
    }
    state = checkpoint["state_dict"]
    assert set(expected) <= set(state)
    assert not any("transformer.h.0.attn.c_attn.base_layer.weight" in k or k.endswith("wte.weight") for k in state)
    for key, value in expected.items():
        assert type(state[key]) is torch.Tensor and state[key].shape == value.shape  # consolidated, not shards
    assert checkpoint["optimizer_states"], "the optimizer state must be saved for resume"


@pytest.mark.slow
@pytest.mark.parametrize("tuner", TUNERS)
def test_parameter_counts_agree_on_every_rank(run, tuner):
    _, out = run
    trainable = sum(p.numel() for p in _single_process(tuner).parameters() if p.requires_grad)
    total = sum(p.numel() for p in _single_process(tuner).parameters())
    for phase in ("full", "part", "resume"):
        rank0, rank1 = _rank(out, tuner, phase, 0), _rank(out, tuner, phase, 1)
        assert rank0["counts"] == rank1["counts"] == (trainable, total)  # DTensors count at global size
        assert rank0["callback_counts"] == rank1["callback_counts"] == (trainable, total)


@pytest.mark.slow
@pytest.mark.parametrize("tuner", ("lora", "ia3"))
def test_merged_export_loads_as_a_plain_model(run, tuner):
    from transformers import GPT2LMHeadModel

    _, out = run
    merged = GPT2LMHeadModel.from_pretrained(out / tuner / "full" / "merged").eval()
    assert not any("lora_" in n or "ia3_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        logits = merged(input_ids=probe_ids()).logits
    torch.testing.assert_close(logits, _rank(out, tuner, "full", 0)["logits"], rtol=1e-4, atol=1e-4)


# ---- two models, two PEFTCallbacks, export="best" (the `two` fit) ------------------------------------------
def _two(out: Path, rank: int) -> dict:
    return torch.load(out / "two" / f"rank{rank}.pt", weights_only=False)


def _best_checkpoint_adapter(path: str, attr: str) -> dict:
    """The adapter tensors of `attr` inside a .ckpt, keyed as in adapter_model.safetensors."""
    from lightning_peft import get_peft_model
    from lightning_peft.serialization import get_peft_model_state_dict

    tuner, seed = TWO[attr]
    state_dict = torch.load(path, weights_only=True)["state_dict"]
    prefix = f"{attr}."
    own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return get_peft_model_state_dict(get_peft_model(build_model(seed), tuner_config(tuner)), state_dict=own)


@pytest.mark.slow
@pytest.mark.parametrize("attr", list(TWO))
def test_two_models_each_export_its_adapter_and_merged_model(run, attr):
    from transformers import GPT2LMHeadModel

    from lightning_peft import PeftModel, get_peft_model
    from lightning_peft.serialization import get_peft_model_state_dict

    _, out = run
    tuner, seed = TWO[attr]
    export = out / "two" / attr
    assert (export / "adapter" / "adapter_config.json").is_file()
    assert (
        PeftModel.from_pretrained(build_model(seed), str(export / "adapter")).peft_config["default"].peft_type.value
        == tuner.upper()
    )
    exported = load_file(export / "adapter" / "adapter_model.safetensors")
    initial = get_peft_model_state_dict(get_peft_model(build_model(seed), tuner_config(tuner)))
    assert set(exported) == set(initial)  # this model's adapter only, none of the other model's keys
    assert any(not torch.equal(exported[k], initial[k]) for k in initial), "the adapter did not train"
    rank0, rank1 = _two(out, 0), _two(out, 1)
    assert rank0["global_step"] == rank1["global_step"] == STEPS
    for key in initial:  # the ranks agree on both adapters (full tensors, not shards)
        torch.testing.assert_close(rank0["adapters"][attr][key], rank1["adapters"][attr][key], rtol=0, atol=0)
    expected = rank0["adapters"][attr] if attr == "aux" else _best_checkpoint_adapter(rank0["best"], attr)  # last/best
    for key, value in exported.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    merged = GPT2LMHeadModel.from_pretrained(export / "merged").eval()  # the exported adapter, merged
    reloaded = PeftModel.from_pretrained(build_model(seed), str(export / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=probe_ids()).logits, reloaded(input_ids=probe_ids()).logits, rtol=1e-4, atol=1e-4
        )


@pytest.mark.slow
def test_export_best_writes_the_best_checkpoints_adapter_not_the_last(run):
    _, out = run
    rank0 = _two(out, 0)
    assert Path(rank0["best"]).name == "epoch=0-step=1.ckpt"  # order=0 at the first step, mode="min"
    best = _best_checkpoint_adapter(rank0["best"], "model")
    last = rank0["adapters"]["model"]
    exported = load_file(out / "two" / "model" / "adapter" / "adapter_model.safetensors")
    assert set(exported) == set(best) == set(last)
    assert any(not torch.equal(best[k], last[k]) for k in best), (
        "best and last must differ for this test to mean anything"
    )
    for key in exported:
        torch.testing.assert_close(exported[key], best[key], rtol=0, atol=0)
