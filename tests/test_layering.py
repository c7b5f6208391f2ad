"""The package's layers hold (issue 22): one module per concept, imports only downwards, one config reader.

Read from the source text (AST), so a violation is caught even in a function-local import that no test runs."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "cinema_jax"


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def _imports(tree) -> set[str]:
    """Every module an import statement names (`from a.b import c` gives a.b and a.b.c)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_data_never_imports_tasks_or_jax_training_code():
    bad = [(_rel(p), m) for p, t in _modules() if p.parent.name == "data"
           for m in _imports(t) if m.startswith(("cinema_jax.tasks", "cinema_jax.train"))]
    assert not bad, bad


def test_no_module_reaches_into_the_segmentation_task_for_helpers():
    seg = PKG / "tasks" / "segment.py"
    bad = [(_rel(p), m) for p, t in _modules() if p != seg
           for m in _imports(t) if m.startswith("cinema_jax.tasks.segment")]
    assert not bad, bad


def test_views_are_defined_once():
    where = []
    for path in [*PKG.rglob("*.py"), *(ROOT / "configs").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == "VIEWS" for t in targets):
                where.append(_rel(path))
    assert where == ["cinema_jax/data/phantom.py"], where


def test_one_config_reader():
    """`cinema_jax.config.get` / `to_plain` only: no private getters or plain-copies elsewhere."""
    names = {"cfg_get", "_cfg", "_cfg_get", "_get", "_plain", "plain", "_required"}
    bad = [(_rel(p), n.name) for p, t in _modules() if p.name != "config.py" for n in ast.walk(t)
           if isinstance(n, ast.FunctionDef) and n.name in names]
    assert not bad, bad


def test_no_scaffolding_from_the_parallel_build():
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        assert "_TaskBase = object" not in text, _rel(path)
        assert 'hasattr(task, "configure")' not in text and "hasattr(self.task, \"configure\")" not in text, \
            _rel(path)


def test_module_sizes():
    datasets = PKG / "data" / "datasets.py"
    assert not datasets.exists() or len(datasets.read_text().splitlines()) < 300
    bench = PKG / "bench"
    assert bench.is_dir() and not (PKG / "bench.py").exists()
    big = [(_rel(p), n) for p in bench.glob("*.py") if (n := len(p.read_text().splitlines())) >= 500]
    assert not big, big
