"""The package's shape: import layers without circles, short functions, docs generated from the code,
and the README's Python example running as written."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "resunet"
MAX_FUNCTION_LINES = 80
#: functions allowed to be longer than MAX_FUNCTION_LINES, with the reason (keep this short)
LONG_FUNCTIONS: dict[str, str] = {}
#: folder -> folders (and root modules) of resunet it must never import, with the reason
FORBIDDEN = {
    "infer": {"train", "plan", "serve", "demo", "cli"},  # inference is below training and serving
    "data": {"root", "model", "nets", "train", "infer", "plan", "serve", "export", "cli"},  # the ground floor
    "nets": {"data", "model", "train", "infer", "plan", "serve", "export", "cli"},
    "model": {"train", "infer", "plan", "serve", "export", "cli", "demo"},  # the contract others read
    "export": {"train", "infer", "plan", "serve", "cli"},
    "train": {"plan", "serve", "cli", "demo"},  # the trainer never imports the planner
    "serve": {"train", "plan", "cli", "demo"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """resunet modules ``path`` imports anywhere (module level or inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("resunet"):
                continue
            found = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            out |= set(found) or {target}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("resunet")}
    return {m for m in out if m != name}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _folder(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"  # the package itself: resunet/__init__.py
    return parts[1]


def test_no_import_circle_and_the_layers_hold():
    graph = import_graph()
    assert cycles(graph) == []
    broken = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if _folder(target) in FORBIDDEN.get(_folder(module), set())
    )
    assert broken == []


def test_the_checker_sees_circles_and_imports():
    graph = {"resunet.a": {"resunet.b"}, "resunet.b": {"resunet.c"}, "resunet.c": {"resunet.a"}, "resunet.d": set()}
    assert cycles(graph) == [["resunet.a", "resunet.b", "resunet.c"]]
    modules = set(import_graph())
    # module-level and function-level imports are both seen
    found = _imports(PACKAGE / "infer" / "predictor.py", modules)
    assert {"resunet.model", "resunet.infer.backends", "resunet.data.sampling"} <= found


def own_lines(node: ast.AST) -> int:
    """Lines of a function without its docstring and without the functions / classes it defines
    (those are measured on their own)."""
    lines = node.end_lineno - node.lineno + 1
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        lines -= body[0].end_lineno - body[0].lineno + 1
    todo = list(ast.iter_child_nodes(node))
    while todo:
        child = todo.pop()
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            lines -= child.end_lineno - child.lineno + 1 + len(child.decorator_list)
        else:
            todo.extend(ast.iter_child_nodes(child))
    return lines


def test_no_function_longer_than_80_lines():
    long = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                key = f"{_module_name(path)}.{node.name}"
                if own_lines(node) > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS:
                    long[key] = own_lines(node)
    assert long == {}


def test_own_lines_counts_code_not_docstrings_or_nested_functions():
    source = 'def f():\n    """doc\n    more"""\n    x = 1\n    def g():\n        return 2\n    return x\n'
    assert own_lines(ast.parse(source).body[0]) == 3  # def, x = 1, return x


def _gen_docs():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gen_docs
    finally:
        sys.path.pop(0)
    return gen_docs


def test_generated_docs_are_current():
    gen_docs = _gen_docs()
    for path, text in gen_docs.generated().items():
        assert path.is_file() and path.read_text() == text, f"{path} is stale: run python tools/gen_docs.py"


def test_every_config_field_is_documented_with_a_meaning():
    from resunet.train.config import TrainConfig

    sections = _gen_docs().config_sections(TrainConfig)
    rows = [row for _, _, rows in sections for row in rows]
    assert len(rows) > 90  # every leaf field, nested sections included
    assert [key for key, _, _, meaning in rows if not meaning] == []
    keys = {key for key, *_ in rows}
    assert {"data.preprocess.target_spacing", "augment.low_resolution.zoom", "stages.N.patch_size", "precision"} <= keys


def test_every_cli_command_is_in_the_reference():
    text = _gen_docs().cli_reference()
    for command in ("plan", "train", "predict", "evaluate", "compare", "export", "serve http", "serve dicom"):
        assert f"## `resunet {command}`" in text
    assert "`--minutes`" in text and "`--backend`" in text


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- test: python api -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md has no Python API example (marker <!-- test: python api -->)"
    return match.group(1)


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path):
    """The README example as written, its paths pointed at a small real-MRI dataset (demo slabs,
    cropped) and its budget at three minutes (planning -- fingerprint, cache, precision and step
    timings -- takes most of the first minute on a 2-core box)."""
    from resunet import read_volume
    from resunet.demo import prepare_dataset
    from test_train import BOX

    dataset = prepare_dataset(tmp_path / "mni" / "dataset", z_range=(70, 94), thickness=6, test_slabs=(3,), box=BOX)
    image = sorted((dataset / "imagesTs").glob("*_0000.nii.gz"))[0]
    code = (readme_python_example().replace("path/to/Task04_Hippocampus", str(dataset))
            .replace("minutes=10", "minutes=3").replace("path/to/case.nii.gz", str(image))
            .replace("case_mask.nii.gz", str(tmp_path / "mask.nii.gz")))
    env = {**os.environ, "RESUNET_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    mask, source = read_volume(tmp_path / "mask.nii.gz"), read_volume(image)
    assert mask.shape == source.shape and set(mask.array.ravel().tolist()) <= {0, 1, 2}
    assert (mask.array > 0).mean() > 0.05  # it found tissue
