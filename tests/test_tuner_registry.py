"""A tuner is one folder plus one YAML: the registry, what every registered tuner must bring along, and a tuner
added from outside the package through the registry alone."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_gpt2
from hydra.utils import get_class

import lightning_peft as lp
from lightning_peft.config import PeftType
from lightning_peft.tuners import registry
from lightning_peft.tuners.lora import LoraModel

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "lightning_peft"
TUNER_YAMLS = PACKAGE / "app" / "configs" / "tuner"
ADAPTER_API = (
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "disable_adapter",
    "unload",
    "peft_state_dict",
    "load_peft_state_dict",
    "peft_model_modules",
)


def test_the_registry_holds_the_five_tuners_and_names_them_all():
    # a new tuner adds itself here; this list is what must never go missing
    assert {"LORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"} <= set(registry.registered_tuners())
    assert registry.get_config_class("lora") is lp.LoraConfig
    assert registry.get_model_class(PeftType.PREFIX_TUNING).__name__ == "PrefixTuningModel"
    known = ", ".join(sorted(registry.registered_tuners()))
    with pytest.raises(ValueError, match=re.escape(f"unknown peft_type 'NOT_A_TUNER'; lightning_peft knows: {known}")):
        registry.get_tuner("NOT_A_TUNER")


def test_the_app_tests_cover_every_registered_tuner():
    import test_app

    missing = sorted({t.lower() for t in registry.registered_tuners()} - set(test_app.TUNERS))
    assert missing == [], f"add {missing} to tests/test_app.py's TUNERS, LEARNING_RATE and CONFIG_CLASS"


@pytest.mark.parametrize("peft_type", sorted(registry.registered_tuners()))
def test_every_tuner_has_the_adapter_api_and_names_its_type_once(peft_type):
    spec = registry.get_tuner(peft_type)
    assert spec.config_class.PEFT_TYPE == peft_type == spec.model_class.peft_type
    assert spec.config_class().peft_type == peft_type  # the instance takes its type from the class
    missing = [name for name in ADAPTER_API if not callable(getattr(spec.model_class, name, None))]
    assert missing == []


@pytest.mark.parametrize("peft_type", sorted(registry.registered_tuners()))
def test_every_tuner_has_its_app_yaml(peft_type):
    path = TUNER_YAMLS / f"{peft_type.lower()}.yaml"
    assert path.is_file(), f"{path.relative_to(REPO)} is missing: every tuner needs its config group choice"
    data = yaml.safe_load(path.read_text())
    assert get_class(data["_target_"]) is registry.get_config_class(peft_type)
    assert {"lr", "weight_decay", "warmup_ratio"} <= set(data.get("optim", {})), "the tuner's optimiser defaults"


@pytest.mark.parametrize("peft_type", sorted(registry.registered_tuners()))
def test_every_tuner_has_its_readme_row(peft_type):
    readme = (REPO / "README.md").read_text()
    config_name = registry.get_config_class(peft_type).__name__
    assert re.search(rf"^\| `{peft_type}` \| `{config_name}` \|", readme, flags=re.M), (
        f"README's tuner table has no row for {peft_type}"
    )


def _parity_marks() -> dict[str, set[str]]:
    """peft type -> test files that mark a test `pytest.mark.parity("<TYPE>", ...)` and import HF `peft`."""
    found: dict[str, set[str]] = {}
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        imports_peft = any(
            (isinstance(n, ast.Import) and any(a.name == "peft" for a in n.names))
            or (isinstance(n, ast.ImportFrom) and n.module == "peft")
            for n in tree.body
        )
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "pytest.mark.parity" and imports_peft:
                for arg in node.args:
                    found.setdefault(ast.literal_eval(arg), set()).add(path.name)
    return found


@pytest.mark.parametrize("peft_type", sorted(registry.registered_tuners()))
def test_every_tuner_has_a_parity_test_against_hf_peft(peft_type):
    assert peft_type in _parity_marks(), f"no test marked pytest.mark.parity({peft_type!r}) compares with HF peft"


def _imports_outside_type_checking(tree: ast.AST) -> list[ast.stmt]:
    """Every import statement, at module level or inside functions, except under `if TYPE_CHECKING:`."""
    found: list[ast.stmt] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _module_imports(path: Path) -> set[str]:
    """Modules of the package that `path` imports, lazily (inside functions) or not; `registry` finds the tuner
    folders by listing them, which names none of them."""
    name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _imports_outside_type_checking(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                out.add(
                    candidate
                    if (REPO / candidate.replace(".", "/")).exists()
                    or (REPO / (candidate.replace(".", "/") + ".py")).exists()
                    else base
                )
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("lightning_peft")}


def test_the_core_package_has_no_import_cycles():
    """Core = everything but the app and the recipes (whose submodules read their package's paths)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] in ("app", "recipes"):
            continue
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = _module_imports(path)
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            cycles.append(stack[stack.index(node) :] + [node])
            return
        for nxt in graph.get(node, ()):
            visit(nxt, stack + [node])

    for start in graph:
        visit(start, [])
    assert cycles == []


# ---------------------------------------------------------------- a tuner added from outside
class ScaledLoraConfig(lp.LoraConfig):
    """A stand-in for a new tuner: LoRA's maths under another peft type, declared in this file only."""

    PEFT_TYPE = PeftType.LOHA


class ScaledLoraModel(LoraModel):
    peft_type = PeftType.LOHA


@pytest.fixture
def new_tuner(monkeypatch):
    monkeypatch.setattr(registry, "_TUNERS", dict(registry.registered_tuners()))
    return registry.register_tuner(ScaledLoraConfig, ScaledLoraModel)


def test_a_registered_tuner_works_everywhere_without_touching_the_package(new_tuner, tmp_path):
    model = lp.get_peft_model(tiny_gpt2(), ScaledLoraConfig(target_modules=["c_attn"], init_lora_weights=False))
    assert isinstance(model.tuner, ScaledLoraModel)
    model.save_pretrained(tmp_path)
    config = lp.PeftConfig.from_pretrained(tmp_path)
    assert type(config) is ScaledLoraConfig and config.peft_type == "LOHA"
    loaded = lp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    ids = torch.arange(6).unsqueeze(0)
    torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=0, atol=0)


def test_registering_a_second_config_for_a_type_is_refused(new_tuner):
    class Other(ScaledLoraConfig):
        pass

    with pytest.raises(ValueError, match="peft_type LOHA is registered twice"):
        registry.register_tuner(Other, ScaledLoraModel)


def test_registering_something_that_is_not_a_tuner_is_refused(new_tuner):
    before = registry.registered_tuners()
    with pytest.raises(TypeError, match="is not a tuner config class"):
        registry.register_tuner(dict, ScaledLoraModel)
    with pytest.raises(TypeError, match="is not a tuner model class"):
        registry.register_tuner(ScaledLoraConfig, dict)
    with pytest.raises(TypeError, match=r"quantized layers for \['int8'\] need an `accepts"):
        registry.register_tuner(ScaledLoraConfig, ScaledLoraModel, quantized_layers={"int8": dict})
    assert registry.registered_tuners() == before
