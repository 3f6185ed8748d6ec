"""Imports run downward through the layers of docs/design.md, and no modules import in a circle.

Every ``import`` in the package is read (module level and inside functions, since a lazy import
is a dependency too) and each module is placed in its layer by the longest matching name in
:data:`LAYERS`. A module may import its own layer and the layers below it, never above, and the
import graph of the package's modules has no cycle. The package facades re-export what lies
below them: ``himnet_fast`` (the top) and ``himnet_fast.ops`` (the ops, the graph and the cell).
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = (  # lowest first
    ("base", ("himnet_fast._argtypes", "himnet_fast._backend", "himnet_fast._checks", "himnet_fast._cuda_ext_loader",
              "himnet_fast._dtypes", "himnet_fast.checkpoint", "himnet_fast.partition", "himnet_fast.presets",
              "himnet_fast.reference", "himnet_fast.reference_models")),
    ("data", ("himnet_fast.data", "himnet_fast.datasets")),
    ("kernels", ("himnet_fast.kernels",)),
    ("ops", ("himnet_fast.ops._common", "himnet_fast.ops._cuda", "himnet_fast.ops._triton",
             "himnet_fast.ops.meta_linear", "himnet_fast.ops.adaptive_matmul", "himnet_fast.ops.gcru",
             "himnet_fast.ops.block_attention", "himnet_fast.ops.partitioned_adaptive")),
    ("graph", ("himnet_fast.ops.graph",)),
    ("cell", ("himnet_fast.ops.gcru_cell", "himnet_fast.ops.gcru_pair", "himnet_fast.ops.gcru_decoder", "himnet_fast.ops")),
    ("nn", ("himnet_fast.nn",)),
    ("models", ("himnet_fast.models", "himnet_fast.sba")),
    ("apps", ("himnet_fast.training", "himnet_fast.benchmark", "himnet_fast.cli", "himnet_fast.__main__",
              "himnet_fast.aot", "himnet_fast")),
)
RANK = {name: (i, layer) for i, (layer, names) in enumerate(LAYERS) for name in names}


def _modules():
    """{module name: file} for the package, its Triton kernels installed as himnet_fast.kernels."""
    mods = {}
    for base, prefix in ((ROOT / "himnet_fast", "himnet_fast"), (ROOT / "kernels", "himnet_fast.kernels")):
        for path in base.rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join((prefix,) + parts)] = path
    return mods


def _imports(name, path, mods):
    """The package modules ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                out.add(full if full in mods else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in mods and m != name}


def _layer(name):
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        hit = RANK.get(".".join(parts[:i]))
        if hit is not None:
            return hit
    raise AssertionError(f"{name} is in no layer: add it to LAYERS in tests/test_layers.py and docs/design.md")


def _graph():
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def test_every_module_has_a_layer():
    for name in _graph():
        _layer(name)


def test_imports_run_downward():
    upward = []
    for name, deps in _graph().items():
        rank, layer = _layer(name)
        for dep in deps:
            dep_rank, dep_layer = _layer(dep)
            if dep_rank > rank:
                upward.append(f"{name} ({layer}) imports {dep} ({dep_layer})")
    assert not upward, "imports up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _graph()
    # The facades re-export their layers: a module importing a sibling through the package
    # would run the facade first; count only module-to-module edges for the cycle check.
    facades = {"himnet_fast", "himnet_fast.ops"}
    graph = {m: {d for d in deps if d not in facades} for m, deps in graph.items()}
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"
    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_finds_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The checks fail where they should: an ops module importing nn, and two modules that
    import each other."""
    pkg = tmp_path / "himnet_fast"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "nn").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "meta_linear.py").write_text("from ..nn import gcn\n")
    (pkg / "nn" / "__init__.py").write_text("")
    (pkg / "nn" / "gcn.py").write_text("from . import gcru\n")
    (pkg / "nn" / "gcru.py").write_text("def f():\n    from .gcn import x\n")
    (tmp_path / "kernels").mkdir()
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    failed = []
    for check in (test_imports_run_downward, test_no_import_cycles):
        try:
            check()
        except AssertionError as exc:
            failed.append(str(exc))
    assert len(failed) == 2
    assert "himnet_fast.ops.meta_linear (ops) imports himnet_fast.nn.gcn (nn)" in failed[0]
    assert "himnet_fast.nn.gcn -> himnet_fast.nn.gcru -> himnet_fast.nn.gcn" in failed[1]
