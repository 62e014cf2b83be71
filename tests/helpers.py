"""Helpers shared by the test files: tiny models built from configs (no downloads), seeded inputs, logits,
perturbing the trainable tensors, silencing a call, reading a saved adapter's key set.

Import as `from helpers import ...`: pytest puts tests/ on sys.path when it imports tests/conftest.py (which
imports this module first, so the offline switches below are set before any test file loads transformers), and
the worker scripts run from tests/.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

# MKL may otherwise use fewer threads when the machine is busy, and a GEMM split differently rounds differently:
# the tests compare repeated forwards bit for bit. Set before torch loads MKL.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
# One intra-op thread, here and in every child process the tests start (they inherit the variable): the tiny models
# gain nothing from a second thread, and on a busy 2-core machine an OpenMP thread waiting for its partner's core
# slowed the in-process tests 3-5x (e.g. 20 s -> 90 s for test_recipes / test_lightning / test_prompt_learning /
# test_lora_parity together). OMP_NUM_THREADS=<n> in the environment still chooses.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # conftest.py imports torch before this module

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 64


# ---- tiny models ---------------------------------------------------------------------------------
def tiny_gpt2(seed: int = 0, **overrides: Any) -> nn.Module:
    """`overrides`: config fields, the sizes below included (e.g. dropout 0 for exact-resume tests, one layer)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        **{
            "n_layer": 2,
            "n_embd": 32,
            "n_head": 4,
            "vocab_size": VOCAB,
            "n_positions": 64,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 0,
            **overrides,
        }
    )
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0, **overrides: Any) -> nn.Module:
    """`overrides`: config fields, the sizes below included (e.g. dropout 0 for exact-resume tests, one layer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        **{
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": VOCAB,
            "max_position_embeddings": 64,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 0,
            **overrides,
        }
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert_classifier(seed: int = 0, num_labels: int = 3, **overrides: Any) -> nn.Module:
    """`overrides`: config fields, the sizes below included (e.g. dropout 0 for exact-resume tests, one layer)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        **{
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "vocab_size": VOCAB,
            "max_position_embeddings": 64,
            "num_labels": num_labels,
            **overrides,
        }
    )
    return BertForSequenceClassification(config).eval()


def tiny_t5(seed: int = 0, **overrides: Any) -> nn.Module:
    """`overrides`: config fields, the sizes below included (e.g. dropout 0 for exact-resume tests, one layer)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        **{
            "num_layers": 2,
            "num_decoder_layers": 2,
            "d_model": 32,
            "d_ff": 64,
            "num_heads": 4,
            "d_kv": 8,
            "vocab_size": VOCAB,
            "decoder_start_token_id": 0,
            "pad_token_id": 0,
            "eos_token_id": 1,
            **overrides,
        }
    )
    return T5ForConditionalGeneration(config).eval()


class TinyConvNet(nn.Module):
    """A small Conv2d net with a 3x3 and a 1x1 convolution and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


def tiny_convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyConvNet().eval()


# ---- inputs and outputs --------------------------------------------------------------------------
def ids(seed: int = 1, length: int = 12) -> torch.Tensor:
    """A (2, length) batch of token ids in [1, VOCAB), the same for the same seed."""
    return torch.randint(1, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def image(seed: int = 1) -> torch.Tensor:
    """A (2, 3, 8, 8) batch for TinyConvNet."""
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x) -> torch.Tensor:
    """The model's logits (no autograd) for a tensor input or a dict of keyword inputs; plain tensors pass through."""
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


# ---- weights ---------------------------------------------------------------------------------------
def perturb(model: nn.Module, seed: int = 3, scale: float = 0.2, trainable_only: bool = True) -> None:
    """Add scale * N(0, 1) noise (seeded, in sorted name order) to every trainable tensor (or every tensor), so
    that adapters (A, B, vectors, biases, saved modules, prompt encoders) have non-trivial values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad or not trainable_only:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def quiet(fn, *args, **kwargs):
    """fn(*args, **kwargs) with every warning silenced (HF peft's and transformers' chatter)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def saved_shapes(folder) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the tensors in folder/adapter_model.safetensors."""
    from safetensors.torch import load_file

    return {k: tuple(v.shape) for k, v in load_file(Path(folder) / "adapter_model.safetensors").items()}


def save_and_reload(
    writer, reader, base: nn.Module, config_name: str, kwargs: dict, folder, scale: float = 0.2, silence: bool = False
):
    """Build writer.get_peft_model(copy of base, writer.<config_name>(**kwargs)), perturb its trainable tensors,
    save it to folder and load that with reader.PeftModel.from_pretrained(another copy of base, folder).
    writer / reader are the modules `lightning_peft` or `peft`. Returns (written, read), both in eval mode."""
    import copy

    call = quiet if silence else (lambda fn, *a, **k: fn(*a, **k))
    written = call(writer.get_peft_model, copy.deepcopy(base), getattr(writer, config_name)(**kwargs)).eval()
    perturb(written, scale=scale)
    written.save_pretrained(folder)
    read = call(reader.PeftModel.from_pretrained, copy.deepcopy(base), folder).eval()
    return written, read


def fresh_saved_shapes(lib, base: nn.Module, config, folder) -> dict[str, tuple[int, ...]]:
    """{key: shape} of what lib.get_peft_model(copy of base, config).save_pretrained(folder) writes."""
    import copy

    quiet(lib.get_peft_model, copy.deepcopy(base), config).save_pretrained(folder)
    return saved_shapes(folder)


# ---- bad inputs: the model and files must be as they were after a refused call ----
GPT2_LORA = dict(target_modules=["c_attn"], fan_in_fan_out=True)


def snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool], dict[str, type]]:
    """The weights, which parameters require grad, and the module types (wrappers left behind show there)."""
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: type(m) for n, m in model.named_modules()},
    )


def unchanged(model: torch.nn.Module, before: tuple) -> bool:
    weights, requires_grad, types = before
    after = model.state_dict()
    return (
        sorted(after) == sorted(weights)
        and all(torch.equal(after[k], v) for k, v in weights.items())
        and {n: p.requires_grad for n, p in model.named_parameters()} == requires_grad
        and {n: type(m) for n, m in model.named_modules()} == types
    )


def load_fails(base, folder, match, **kwargs):
    before = snapshot(base)
    with pytest.raises((ValueError, FileNotFoundError, TypeError), match=match):
        import lightning_peft as lp

        lp.PeftModel.from_pretrained(base, folder, **kwargs)
    assert unchanged(base, before), "a failed load must leave the base model untouched"


def edit_config(folder, **changes):
    data = json.loads((folder / "adapter_config.json").read_text())
    data.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(data))
    return data


# ---- Lightning runs --------------------------------------------------------------------------------
def quiet_trainer(**kwargs: Any) -> Any:
    """A CPU `lightning.pytorch.Trainer` without logger, progress bar or model summary; `kwargs` add or override.
    Its folder (checkpoints, exports) is a fresh temporary one unless `default_root_dir` is given: never the cwd."""
    import tempfile

    import lightning.pytorch as pl

    kwargs.setdefault("default_root_dir", tempfile.mkdtemp(prefix="lp-trainer-"))
    return pl.Trainer(
        **{"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False, **kwargs}
    )


def token_loader(rows: int = 6, length: int = 12, batch_size: int = 2, seed: int = 0) -> Any:
    """Batches of random token ids (1..VOCAB-1) in a `(input_ids,)` TensorDataset."""
    from torch.utils.data import DataLoader, TensorDataset

    ids = torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(ids), batch_size=batch_size)


# ---- child processes without paying the imports again ---------------------------------------------
# Many tests run a script in a child process: to SIGKILL it and resume in a new process, to cap its memory, to run
# the command line end to end. `python script.py` spends 5-10 s of CPU importing torch, transformers, Lightning and
# Hydra before it does anything. `Forked` / `run_forked()` start the child from multiprocessing's fork server,
# which imported those once: each child is still a new process (its own pid and memory, nothing of an earlier
# child left in it, killed by a signal like any other) that runs the script as `__main__` with the given argv,
# cwd and environment, and gives Popen's returncode (-9 after a SIGKILL). With DDP / FSDP the child is rank 0;
# Lightning's launcher starts the other ranks as new interpreters running the script (sys.argv) again.
# Environment variables that libraries read at import (HF_HUB_OFFLINE, OMP_NUM_THREADS, ...) keep the values
# this test process had when the server started (helpers sets the offline switches above).
FORK_PRELOAD = [
    "numpy",
    "torch",
    "transformers",
    "safetensors.torch",
    "lightning.pytorch",
    "torchmetrics",
    "torchdata.stateful_dataloader",
    "lightning_peft",
    "lightning_peft.lightning",
    "lightning_peft.recipes.classification",
    "lightning_peft.recipes.causal_lm",
    "lightning_peft.recipes.seq2seq",
    "hydra",
    "omegaconf",
    "lightning_peft.app.train",
    "lightning_peft.app.schema",
    "lightning_peft.app.report",
    "lightning_peft.app.multirun",
]
_fork_context: Any = None
_python_path: list[str] = []  # sys.path of a new interpreter (no script, no PYTHONPATH)


def _fork_server() -> Any:
    global _fork_context
    if _fork_context is None:
        import multiprocessing
        import subprocess
        import sys

        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        code = "import json, sys; print(json.dumps(sys.path[1:]))"
        _python_path[:] = json.loads(subprocess.check_output([sys.executable, "-c", code], env=env, text=True))
        _fork_context = multiprocessing.get_context("forkserver")
        _fork_context.set_forkserver_preload(FORK_PRELOAD)
    return _fork_context


def _forked_main(
    args: list[str],
    cwd: str | None,
    env: dict[str, str] | None,
    stdout: str,
    stderr: str,
    limit_as: int | None,
    python_path: list[str],
) -> None:
    """In the child: what `python *args` would do, in `cwd` with `env`, stdout / stderr into the given files."""
    import multiprocessing
    import resource
    import runpy
    import sys
    import warnings

    multiprocessing.set_start_method(None, force=True)  # as in a new interpreter (the server set "forkserver")
    if cwd is not None:
        os.chdir(cwd)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    sys.stdout.flush()  # nothing of the server's own output may end up in the child's
    sys.stderr.flush()
    out = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = out if stderr == stdout else os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    if err != out:
        os.close(err)
    # sys.path as python would make it: the script's folder ('' for -c), PYTHONPATH, then the interpreter's own
    extra = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    first = "" if args[0] == "-c" else os.path.dirname(os.path.abspath(args[0]))
    sys.path[:] = [first, *extra, *python_path]
    for option in [o for o in os.environ.get("PYTHONWARNINGS", "").split(",") if o]:
        warnings._setoption(option)  # type: ignore[attr-defined]  # what python does with PYTHONWARNINGS
    if limit_as is not None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))
    if args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102  (the test's own code)
    else:
        sys.argv = list(args)
        runpy.run_path(args[0], run_name="__main__")


class Forked:
    """A Popen-like handle on `python *args` run by the fork server (see above). `merge_stderr`: stderr goes into
    stdout, as `stderr=subprocess.STDOUT`; `limit_as`: RLIMIT_AS of the child in bytes, set before the script runs."""

    def __init__(
        self,
        args: list[str],
        cwd: Any = None,
        env: dict[str, str] | None = None,
        merge_stderr: bool = False,
        limit_as: int | None = None,
    ) -> None:
        import tempfile

        self.args = [str(a) for a in args]
        self._dir = tempfile.mkdtemp(prefix="forked-")
        self._stdout = os.path.join(self._dir, "stdout")
        self._stderr = self._stdout if merge_stderr else os.path.join(self._dir, "stderr")
        self._merged = merge_stderr
        server = _fork_server()
        self._process = server.Process(
            target=_forked_main,
            args=(
                self.args,
                None if cwd is None else str(cwd),
                env,
                self._stdout,
                self._stderr,
                limit_as,
                _python_path,
            ),
        )
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def kill(self) -> None:
        if self._process.exitcode is None:
            self._process.kill()

    def wait(self, timeout: float | None = None) -> int:
        import subprocess

        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)  # type: ignore[arg-type]
        return self._process.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str | None]:
        """Wait (killing the child if it outlives `timeout`, then raising TimeoutExpired) and read its output."""
        import shutil

        try:
            self.wait(timeout)
        except Exception:
            self.kill()
            self._process.join()
            raise
        out = Path(self._stdout).read_text(errors="replace") if os.path.exists(self._stdout) else ""
        err = None
        if not self._merged:
            err = Path(self._stderr).read_text(errors="replace") if os.path.exists(self._stderr) else ""
        shutil.rmtree(self._dir, ignore_errors=True)
        return out, err


def run_forked(
    args: list[str],
    cwd: Any = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    limit_as: int | None = None,
) -> Any:
    """`subprocess.run([sys.executable, *args], capture_output=True, text=True, ...)` through the fork server:
    a CompletedProcess with returncode, stdout and stderr."""
    import subprocess

    proc = Forked(args, cwd=cwd, env=env, limit_as=limit_as)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
