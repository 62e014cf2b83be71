"""Saving processes for tests/test_atomic_saves.py: a tiny MLP with two LoRA adapters ("default" and "other")
in two versions that differ in every tensor and in `lora_alpha`.

    python atomic_saves_worker.py serve FOLDER          # each "go" line on stdin forks a child that saves
                                                        # versions 0, 1, 0, ... into FOLDER until it is killed;
                                                        # prints the child's pid, then "reaped" when it is gone
    python atomic_saves_worker.py save FOLDER VERSION TIMES START_FILE   # waits for START_FILE, saves TIMES times
    python atomic_saves_worker.py fsize FOLDER VERSION LIMIT   # saves under RLIMIT_FSIZE=LIMIT bytes
    python atomic_saves_worker.py readonly FOLDER VERSION      # saves as an unprivileged user (uid 65534 if root)
    python atomic_saves_worker.py hold FOLDER           # holds FOLDER's save lock until stdin closes
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning_peft as lp  # noqa: E402
from lightning_peft._files import folder_lock  # noqa: E402
from lightning_peft.serialization import get_peft_model_state_dict  # noqa: E402

ALPHAS = {0: (8, 16), 1: (32, 64)}  # version -> lora_alpha of "default", "other"
ADAPTERS = ("default", "other")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def build(version: int) -> lp.PeftModel:
    """Version 0 or 1: "default" is small (r=1 on fc1: its weights file is smaller than its config), "other" larger."""
    torch.manual_seed(0)
    model = lp.get_peft_model(Net(), lp.LoraConfig(r=1, lora_alpha=ALPHAS[version][0], target_modules=["fc1"]))
    model.add_adapter("other", lp.LoraConfig(r=4, lora_alpha=ALPHAS[version][1], target_modules=["fc1", "fc2"]))
    g = torch.Generator().manual_seed(100 + version)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def tensors(model: lp.PeftModel) -> dict[str, dict[str, torch.Tensor]]:
    return {name: get_peft_model_state_dict(model, adapter_name=name) for name in ADAPTERS if name in model.peft_config}


def serve(folder: str) -> None:
    torch.set_num_threads(1)
    models = [build(0), build(1)]
    for line in sys.stdin:
        if line.strip() != "go":
            break
        pid = os.fork()
        if pid == 0:  # the child saves until it is killed
            try:
                i = 0
                while True:
                    models[i % 2].save_pretrained(folder)
                    i += 1
            finally:
                os._exit(1)
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)


def main() -> None:
    mode, folder = sys.argv[1], sys.argv[2]
    if mode == "serve":
        serve(folder)
    elif mode == "save":
        version, times, start = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        model = build(version)
        while not os.path.exists(start):
            time.sleep(0.001)
        for _ in range(times):
            model.save_pretrained(folder)
    elif mode == "fsize":
        model = build(int(sys.argv[3]))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit raises OSError (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[4]), resource.RLIM_INFINITY))
        try:
            model.save_pretrained(folder)
        except OSError as error:
            print(f"OSError errno={error.errno}: {error}", flush=True)
            sys.exit(3)
    elif mode == "readonly":
        model = build(int(sys.argv[3]))
        if os.geteuid() == 0:  # root writes anywhere: save as nobody
            os.setgid(65534)
            os.setuid(65534)
        try:
            model.save_pretrained(folder)
        except OSError as error:
            print(f"{type(error).__name__}: {error}", flush=True)
            sys.exit(3)
    elif mode == "hold":
        with folder_lock(os.path.abspath(folder)):
            print("held", flush=True)
            sys.stdin.read()
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
