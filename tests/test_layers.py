"""The layer rule of docs/DESIGN.md, checked on every import statement (module level and inside functions).

    clipforget.method  <-  clipforget.gate  <-  clipforget.io  <-  clipforget.governance  <-  clipforget (run, API)
                                                                                           <-  tasks  <-  flows

A module may import its own layer and the layers left of it, never one to its right. The method and the gate
import no orchestration or service client at all (no Prefect, MLflow or boto3): a GPU worker needs torch and
open_clip only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["clipforget.method", "clipforget.gate", "clipforget.io", "clipforget.governance", "clipforget", "tasks",
         "flows"]
SERVICES = ("prefect", "prefect_ray", "mlflow", "boto3", "botocore", "ray")
PURE = {"clipforget.method", "clipforget.gate"}


def layer(module: str) -> int | None:
    """The layer of a first-party module (its longest matching prefix in ORDER), None for third-party ones."""
    best = None
    for i, prefix in enumerate(ORDER):
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(ORDER[best]):
                best = i
    return best


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, relative imports resolved."""
    out = []
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names if layer(f"{base}.{a.name}") is not None
                    and (root / Path(*f"{base}.{a.name}".split("."))).is_dir()]
    return out


def sources() -> list[Path]:
    return sorted(p for top in ("clipforget", "tasks", "flows") for p in (ROOT / top).rglob("*.py"))


def violations(files: list[Path], root: Path = ROOT) -> list[str]:
    found = []
    for path in files:
        me = module_name(path, root)
        mine = layer(me)
        assert mine is not None, me
        for line, target in imports(path, root):
            theirs = layer(target)
            where = f"{path.relative_to(root)}:{line}"
            if theirs is not None and theirs > mine:
                found.append(f"{where}: {me} ({ORDER[mine]}) imports {target} ({ORDER[theirs]})")
            if ORDER[mine] in PURE and target.split(".")[0] in SERVICES:
                found.append(f"{where}: {me} is pure method/gate code but imports {target}")
    return found


def test_no_module_imports_a_layer_above_its_own():
    files = sources()
    assert len(files) > 40  # the scan sees the whole code base
    assert violations(files) == []


@pytest.mark.parametrize("source, bad", [
    ("from clipforget.io.registry import register\n", "clipforget.method"),
    ("from tasks.common import work_root\n", "clipforget.io"),
    ("import flows.pipeline\n", "tasks"),
    ("def f():\n    from prefect import task\n", "clipforget.gate"),
    ("from clipforget.governance import ledger\n", "clipforget.gate"),
], ids=["method imports an adapter", "adapter imports tasks", "tasks import flows",
        "pure code imports prefect in a function", "gate imports the governance package"])
def test_the_rule_catches_an_upward_import(tmp_path, source, bad):
    for top in ("clipforget", "tasks", "flows"):  # the packages' folders, so package imports resolve as in the repo
        for d in [ROOT / top, *(ROOT / top).rglob("*")]:
            if d.is_dir() and "__pycache__" not in d.parts:
                (tmp_path / d.relative_to(ROOT)).mkdir(parents=True, exist_ok=True)
    probe = tmp_path.joinpath(*bad.split(".")) / "probe.py"  # a module of that layer, in a copy of the tree
    probe.write_text(source)
    assert len(violations([probe], tmp_path)) == 1
