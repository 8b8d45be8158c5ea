"""The import rules of docs/architecture.md, checked on the source (AST, nothing imported):

- imports point one way: pipelines -> workers -> {adapters, attention}; adapters and attention import
  neither Ray, MLflow, workers nor pipelines; workers never imports pipelines;
- no module imports another module's underscore names;
- no import circle among the project's modules (function-level imports count too).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("adapters", "attention", "workers", "pipelines")
FORBIDDEN = {
    "adapters": ("ray", "mlflow", "workers", "pipelines", "attention"),
    "attention": ("ray", "mlflow", "workers", "pipelines", "adapters"),
    "workers": ("pipelines",),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names], node.lineno))
    return out


def edges(name: str) -> set[str]:
    """The project modules `name` imports: `from pkg import mod` names the submodule when there is one."""
    out = set()
    for module, names, _ in imports(MODULES[name]):
        if module.split(".")[0] not in PACKAGES:
            continue
        subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
        out.update(subs)
        if len(subs) < len(names) or not names:
            out.add(module if module in MODULES else module.rsplit(".", 1)[0])
    return out - {name}


def test_every_package_folder_is_a_package():
    for pkg in PACKAGES:
        for folder in [ROOT / pkg, *(p for p in (ROOT / pkg).rglob("*") if p.is_dir() and p.name != "__pycache__")]:
            if any(folder.glob("*.py")):
                assert (folder / "__init__.py").is_file(), f"{folder} has modules but no __init__.py"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    bad = [f"{MODULES[m].relative_to(ROOT)}:{line}: imports {module}"
           for m in MODULES if m.split(".")[0] == package
           for module, _, line in imports(MODULES[m]) if module.split(".")[0] in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)


def test_no_module_imports_another_modules_underscore_names():
    bad = [f"{MODULES[m].relative_to(ROOT)}:{line}: from {module} import {n}"
           for m in MODULES for module, names, line in imports(MODULES[m])
           if module.split(".")[0] in PACKAGES and module != m
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    graph = {m: edges(m) for m in MODULES}
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_source_file_is_hidden_by_gitignore():
    # A root pattern like "sweeps/" once matched pipelines/sweeps/ and kept new modules out of commits.
    import subprocess

    out = subprocess.run(["git", "ls-files", "--others", "--ignored", "--exclude-standard", "--", *PACKAGES,
                          "tests", "docs", "examples"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    hidden = [p for p in out.splitlines() if "__pycache__" not in p and not p.endswith(".pyc")]
    assert not hidden, f"ignored by .gitignore, so never committed: {hidden}"
