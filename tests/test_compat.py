"""Private APIs of other packages (Lightning, torch, transformers, Hydra, the stdlib) are used in
`lightning_peft/_compat.py` only (issue 14 item 9): a new use elsewhere fails here."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lightning_peft"
COMPAT = PACKAGE / "_compat.py"
ATTRIBUTE_CALLS = ("getattr", "hasattr", "setattr", "delattr")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own_names(trees: list[ast.AST]) -> set[str]:
    """Private names the package defines itself: functions, classes, module-level and local names, arguments, and
    attributes set on `self` / `cls`. An attribute set on another object (`loop._x = ...`) defines nothing."""
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("self", "cls")
            ):
                names.add(node.attr)
    return names


def foreign_private_uses(source: str, own: set[str], where: str = "<source>") -> list[str]:
    """`from x import _y`, `import x._y`, `obj._y` and `getattr(obj, "_y")` for a private `_y` the package does not
    define (names starting with `_lightning_peft` are our own markers on foreign objects)."""

    def foreign(name: str) -> bool:
        return _private(name) and name not in own and not name.startswith("_lightning_peft")

    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if not node.module.startswith("lightning_peft") and (
                any(_private(part) for part in node.module.split(".")) or any(_private(a.name) for a in node.names)
            ):
                found.append(
                    f"{where}:{node.lineno}: from {node.module} import {', '.join(a.name for a in node.names)}"
                )
        elif isinstance(node, ast.Import):
            found += [
                f"{where}:{node.lineno}: import {a.name}" for a in node.names if any(map(_private, a.name.split(".")))
            ]
        elif isinstance(node, ast.Attribute) and foreign(node.attr):
            found.append(f"{where}:{node.lineno}: .{node.attr}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ATTRIBUTE_CALLS
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and foreign(node.args[1].value)
        ):
            found.append(f"{where}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    return found


@pytest.fixture(scope="module")
def package():
    sources = {path: path.read_text(encoding="utf-8") for path in sorted(PACKAGE.rglob("*.py"))}
    return sources, _own_names([ast.parse(s) for s in sources.values()])


def test_private_foreign_apis_are_used_in_compat_only(package):
    sources, own = package
    found = [
        use
        for path, source in sources.items()
        if path != COMPAT
        for use in foreign_private_uses(source, own, str(path.relative_to(PACKAGE.parent)))
    ]
    assert found == [], "move these into lightning_peft/_compat.py (with a comment on why):\n" + "\n".join(found)
    assert foreign_private_uses(sources[COMPAT], own)  # the scan does see what _compat.py holds


@pytest.mark.parametrize(
    "line",
    [
        "x = trainer._checkpoint_connector._loaded_checkpoint",
        "from lightning.fabric.utilities.optimizer import _optimizers_to_device",
        "from hydra._internal.utils import get_args_parser",
        "import torch._dynamo",
        "torch._dynamo.reset()",
        "inner = getattr(model, '_orig_mod', model)",
        "fit_loop._combined_loader_states_to_load = states",
        "from lightning.pytorch.core.saving import _load_state",
    ],
)
def test_the_scan_finds_each_kind_of_use(package, line):
    _, own = package
    assert foreign_private_uses(line, own)


def test_the_scan_leaves_our_own_names(package):
    _, own = package
    assert foreign_private_uses("self._state = 1\nx = self._state\ny = obj._state\nz = y.__dict__", {"_state"}) == []
    assert (
        foreign_private_uses(
            "from ._files import _x\nfrom lightning_peft.config import _y\nm._lightning_peft_q = 1", own
        )
        == []
    )


def test_ci_runs_the_lowest_lightning_minor_pyproject_allows():
    """pyproject's Lightning floor is the minor CI installs (.ci/run pins it): raise both together."""
    import re

    import lightning

    root = PACKAGE.parent
    floor = re.search(r'"lightning>=(\d+)\.(\d+)', (root / "pyproject.toml").read_text(encoding="utf-8"))
    assert floor is not None
    minor = f"{floor[1]}.{floor[2]}"
    assert f'"lightning=={minor}.*"' in (root / ".ci" / "run").read_text(encoding="utf-8")
    assert lightning.__version__.startswith(f"{minor}."), (lightning.__version__, minor)
