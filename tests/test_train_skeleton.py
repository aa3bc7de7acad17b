"""The training skeleton's contract: the methods share only public functions (no glmtune module reaches into
another glmtune module's private `_name`, read from the source's syntax tree), and the skeleton's docstring, the
guide for adding a method, names its real steps in the order the methods call them."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import glmtune.train
from glmtune.train import processes, skeleton

TRAIN_DIR = Path(glmtune.train.__file__).parent


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _absolute(module: str | None, level: int, package: str) -> str:
    """`from .x import y` inside glmtune.train -> glmtune.train.x (relative imports count as glmtune's)."""
    if level == 0:
        return module or ""
    base = package.split(".")[: len(package.split(".")) - level + 1]
    return ".".join([*base, module] if module else base)


def private_imports(source: str, package: str = "glmtune.train") -> list[str]:
    """Each use of another glmtune module's private name: `from glmtune.x import _y`, `import glmtune.x._y`, and
    `_y` read as an attribute of a glmtune module imported by name (`import glmtune.x as x; x._y`)."""
    tree = ast.parse(source)
    found: list[str] = []
    glmtune_names: set[str] = set()  # local names bound to glmtune modules (or to what they export)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = _absolute(node.module, node.level, package)
            if module.split(".")[0] != "glmtune":
                continue
            if any(_is_private(part) for part in module.split(".")):
                found.append(f"line {node.lineno}: from {module} import ...")
            for alias in node.names:
                if _is_private(alias.name):
                    found.append(f"line {node.lineno}: from {module} import {alias.name}")
                glmtune_names.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "glmtune":
                    continue
                if any(_is_private(part) for part in alias.name.split(".")):
                    found.append(f"line {node.lineno}: import {alias.name}")
                glmtune_names.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in glmtune_names:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_imports_a_private_name_of_another_glmtune_module():
    src = TRAIN_DIR.parent
    modules = sorted(src.rglob("*.py"))
    assert any(path.name == "sft.py" for path in modules)  # the walk found the package
    violations = []
    for path in modules:
        package = ".".join(["glmtune", *path.relative_to(src).parent.parts])
        violations += [f"{path.relative_to(src)} {hit}"
                       for hit in private_imports(path.read_text(encoding="utf-8"), package)]
    assert not violations, "private names used across modules:\n" + "\n".join(violations)


def test_private_import_check_sees_every_way_of_reaching_a_private_name():
    assert private_imports("from glmtune.train.sft import _add_lora, run_sft\n") == \
        ["line 1: from glmtune.train.sft import _add_lora"]
    assert private_imports("from .sft import (\n    _save_final,\n)\n") == \
        ["line 1: from glmtune.train.sft import _save_final"]
    assert private_imports("import glmtune.train.sft as sft\nsft._save_final(1)\n") == \
        ["line 2: sft._save_final"]
    assert private_imports("from glmtune.train import sft\nx = sft._STAGING\n") == ["line 2: sft._STAGING"]
    assert private_imports("import glmtune.models._hidden\n") == ["line 1: import glmtune.models._hidden"]
    # Not another glmtune module's private name: a library's, a module's own, a dunder, a private method of an object.
    assert private_imports("from transformers.trainer_utils import _secret\nfrom glmtune import __version__\n"
                           "def _own():\n    pass\n_own()\nself._prepare_dataset(1)\n") == []


def test_skeleton_docstring_lists_real_steps_in_the_order_sft_and_dpo_take_them():
    steps = re.findall(r"^ ?\d+\. (\w+)", skeleton.__doc__, flags=re.MULTILINE)
    assert len(steps) >= 10, steps
    for name in steps:
        function = getattr(skeleton, name, None) or getattr(processes, name, None)
        assert inspect.isfunction(function), f"{name}: no such public function in skeleton.py or processes.py"
    for method in ("sft", "preference"):  # preference.py: the run of dpo, kto, orpo and simpo
        source = (TRAIN_DIR / f"{method}.py").read_text(encoding="utf-8")
        body = source[source.index(f"def run_{method}("):]
        called = [name for name in steps if f"{name}(" in body]
        assert called == sorted(called, key=lambda name: body.index(f"{name}(")), method
        assert len(called) >= 10, (method, called)  # the method is built on the skeleton, not beside it
