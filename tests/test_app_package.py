"""The app is a package, not a checkout: the library imports without Hydra, and the built wheel (configs
and data as package data) runs `lightning-peft-train` from an empty folder in a fresh virtualenv."""

from __future__ import annotations

import ast
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = REPO_ROOT / "lightning_peft"
APP_ONLY = ("hydra", "omegaconf")


def _module_level_imports(tree: ast.Module) -> list[str]:
    """Top-level names imported outside function bodies (at import time)."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                names.extend(a.name.split(".")[0] for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names.append(child.module.split(".")[0])
            visit(child)

    visit(tree)
    return names


def test_only_the_app_imports_hydra_or_omegaconf_at_import_time():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if (PACKAGE / "app") in path.parents:
            continue
        imported = set(_module_level_imports(ast.parse(path.read_text(encoding="utf-8"))))
        offenders += [f"{path.relative_to(REPO_ROOT)}: {name}" for name in sorted(imported & set(APP_ONLY))]
    assert not offenders


def test_library_imports_without_hydra_and_omegaconf():
    """As if hydra-core (the `app` extra) were not installed: `None` in sys.modules makes importing
    them raise ModuleNotFoundError and `find_spec` report them missing."""
    code = """
import sys
for name in ("hydra", "omegaconf"):
    sys.modules[name] = None
import lightning_peft
from lightning_peft.lightning import PEFTCallback
import lightning_peft.recipes.classification  # the recipes are a library too
import lightning_peft.app  # light: only paths and a lazy main()
callback = PEFTCallback(lightning_peft.LoraConfig(task_type="SEQ_CLS", r=2))
loaded = sorted(m for m, mod in sys.modules.items() if m.split(".")[0] in ("hydra", "omegaconf") and mod is not None)
assert not loaded, loaded
try:
    import hydra  # noqa: F401
except ModuleNotFoundError:
    print("ok")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]


def _run(args, **kwargs):
    proc = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.slow
def test_wheel_runs_the_default_job_from_an_empty_folder(tmp_path):
    """Build the wheel, install it (not editable, no deps) into a fresh venv that sees this environment's
    dependencies through a .pth file, and run the console script's default job for 2 steps."""
    pytest.importorskip("setuptools", reason="builds the wheel offline (--no-build-isolation) with this setuptools")
    # build from a copy of the sources, so the build leaves nothing (build/, *.egg-info) in the checkout
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "lightning_peft", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp_path / "wheels"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(wheels),
            str(src),
        ],
        timeout=300,
    )
    (wheel,) = wheels.glob("lightning_peft-*.whl")
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in (
        "lightning_peft/app/configs/train.yaml",
        "lightning_peft/app/configs/tuner/lora.yaml",
        "lightning_peft/app/data/reviews.csv",
        "lightning_peft/app/data/aspects.jsonl",
        "lightning_peft/recipes/classification.py",
        "lightning_peft/app/train.py",
    ):
        assert shipped in names, shipped
    assert not any(n.startswith(("configs/", "recipes/", "data/")) for n in names)

    # a fresh venv; this environment's site-packages (torch, lightning, hydra, ...) appended to its path by
    # a .pth file. A .pth line only adds a path: the .pth files there (this checkout's editable install)
    # are not run, so `lightning_peft` can only come from the wheel.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    )
    ours = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if os.path.isdir(p)]
    (purelib / "_dev_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        timeout=300,
    )

    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1")
    where = _run(
        [
            str(python),
            "-c",
            "import json, lightning_peft, lightning_peft.app, lightning_peft.recipes, hydra; "
            "print(json.dumps([lightning_peft.__file__, str(lightning_peft.app.CONFIG_DIR), "
            "lightning_peft.recipes.__file__]))",
        ],
        cwd=work,
        env=env,
        timeout=300,
    )
    for path in json.loads(where.stdout):
        assert Path(path).resolve().is_relative_to(purelib.resolve()), path  # the wheel's copy, not the checkout

    script = venv / "bin" / "lightning-peft-train"
    assert script.read_text().startswith(f"#!{python}")
    proc = _run(
        [
            str(script),
            "hydra.run.dir=run",
            "trainer.max_steps=2",
            "data.limit_val_rows=50",
            "trainer.enable_progress_bar=false",
        ],
        cwd=work,
        env=env,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert "validation acc after: " in out and out.count("GPU available: ") == 1
    run = work / "run"
    m = json.loads((run / "metrics.json").read_text())
    assert m["model"] == "minilm" and m["tuner"] == "lora" and m["global_step"] == 2
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "merged" / "config.json").is_file()
    # Hydra read the configs from the installed package
    hydra_yaml = (run / ".hydra" / "hydra.yaml").read_text()
    assert str(purelib / "lightning_peft" / "app" / "configs") in hydra_yaml
    assert sorted(p.name for p in work.iterdir()) == ["run"]
