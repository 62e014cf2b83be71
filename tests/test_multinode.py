"""2 nodes x 1 process on this machine: each process is started as a cluster starts one per node (the same command,
with NODE_RANK, MASTER_ADDR, MASTER_PORT and WORLD_SIZE set; `Trainer(num_nodes=2, devices=1)`, gloo), and trains
LoRA (+ modules_to_save) with DDP and then with FSDP2 (tests/strategies_worker.py `--num-nodes 2`). Both export
the adapter one process exports after seeing, in one batch, the samples the two nodes see together."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from helpers import Forked
from safetensors.torch import load_file
from strategies_worker import STEPS, probe_ids

HERE = Path(__file__).resolve().parent
WORKER = [str(HERE / "strategies_worker.py"), "--tuners", "lora", "--phases", "full", "--no-two"]
# what a launcher (torchrun, SLURM, an earlier Lightning run) may have left: the nodes get only what we set
LAUNCH_VARIABLES = ("LOCAL_RANK", "RANK", "GLOBAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "WORLD_SIZE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCH_VARIABLES and not k.startswith(("SLURM_", "TORCHELASTIC_", "MASTER_"))
    }
    return dict(
        env, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **extra
    )


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("multinode")
    port = str(_free_port())
    procs = [
        Forked(
            [*WORKER, "--strategy", "ddp,fsdp", "--out", str(out / "nodes"), "--num-nodes", "2"],
            env=_env(NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2"),
            merge_stderr=True,
        )
        for node in (0, 1)
    ]
    procs.append(Forked([*WORKER, "--strategy", "single", "--out", str(out / "one")], env=_env(), merge_stderr=True))
    try:
        for proc in procs:
            proc.wait(timeout=300)
    finally:
        for proc in procs:
            proc.kill()
    for proc in procs:
        assert proc.returncode == 0, proc.communicate()[0][-6000:]
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_nodes_export_the_adapter_of_one_process(out, strategy):
    nodes = out / "nodes" / strategy / "lora" / "full"
    one = out / "one" / "lora" / "full"
    exported = load_file(nodes / "adapter" / "adapter_model.safetensors")
    reference = load_file(one / "adapter" / "adapter_model.safetensors")
    assert set(exported) == set(reference) and "base_model.model.transformer.ln_f.weight" in exported
    ranks = [torch.load(nodes / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [STEPS, STEPS]
    single = torch.load(one / "rank0.pt", weights_only=False)
    assert single["world_size"] == 1 and single["global_step"] == STEPS
    for key, value in reference.items():
        for rank in ranks:  # every node holds the full, equal adapter
            torch.testing.assert_close(rank["adapter"][key], exported[key], rtol=0, atol=0)
        torch.testing.assert_close(exported[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert all(exported[k].abs().max() > 0 for k in exported if "lora_B" in k), "the adapter did not train"
    for rank in ranks:  # the trained models compute what the one process's does
        torch.testing.assert_close(rank["logits"], single["logits"], rtol=1e-4, atol=1e-4)
    assert probe_ids().shape == single["logits"].shape[:2]
