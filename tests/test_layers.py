"""The package's shape, checked from its source: imports point down the layers (``pipelines/``, the Ray
Job entry points beside the package, on top), no import circle (function-level imports included), no
function longer than one screen outside the benches, and a wheel that ships every subpackage."""

from __future__ import annotations

import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "scmm_atlas"
PIPELINES = ROOT / "pipelines"
# A layer may import only layers of a lower rank (equal ranks do not import each other).
LAYERS = {
    "memory": 0, "errors": 0, "netif": 0,
    "settings": 1,  # the environment's SCMM_ATLAS_* variables, read in one place
    "store": 2, "model": 2, "faults": 2,
    "data": 3, "ingest": 3,
    "evaluate": 4, "infer": 4, "config": 4,  # run configs: their loader section is the data layer's LoaderConfig
    "train": 5, "results": 5,
    "pipeline": 6,
    "cli_pipeline": 7, "cli_infer": 7,
    "bench": 8,  # runs the user's commands as processes, never imports the CLI
    "cli": 9,
    "pipelines": 10,  # the top-level pipelines/ package: python -m pipelines.run | train | reprocess | demo
}
MAX_FUNCTION_LINES = 60


def _modules(*roots: Path) -> dict[str, Path]:
    out = {}
    for root in roots or (PACKAGE, PIPELINES):
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root.parent).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at any depth of its code."""
    edges: dict[str, set[str]] = collections.defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                found = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            edges[name].update(t for t in found if t in modules and t != name)
    return edges


def _layer(module: str) -> str:
    if module.split(".")[0] == "pipelines":
        return "pipelines"
    return module.split(".")[1] if "." in module else ""


def _upward(modules: dict[str, Path]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in _imports(modules).items() for t in targets
                  if _layer(m) and _layer(t) and _layer(m) != _layer(t) and LAYERS[_layer(m)] <= LAYERS[_layer(t)])


def _circles(edges: dict[str, set[str]]) -> list[str]:
    state: dict[str, str] = {}
    circles: list[str] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                circles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return circles


def test_imports_point_down_the_layers():
    modules = _modules()
    unknown = {_layer(m) for m in modules} - set(LAYERS) - {""}
    assert not unknown, f"new top-level modules {sorted(unknown)}: give them a rank in LAYERS"
    assert _upward(modules) == []


def test_no_import_circle():
    assert _circles(_imports(_modules())) == []


def test_the_checks_see_an_upward_import_and_a_circle(tmp_path):
    """The two checks above, on a made-up package that breaks both rules."""
    pkg = tmp_path / "scmm_atlas"
    for folder in ("store", "train"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "store" / "base.py").write_text("def f():\n    from ..train import loop\n")  # a late import counts too
    (pkg / "train" / "loop.py").write_text("from ..store import base\n")
    modules = _modules(pkg)
    assert _upward(modules) == ["scmm_atlas.store.base -> scmm_atlas.train",
                                "scmm_atlas.store.base -> scmm_atlas.train.loop"]
    assert _circles(_imports(modules)) == ["scmm_atlas.store.base -> scmm_atlas.train.loop -> scmm_atlas.store.base"]


def test_the_pipelines_sit_on_top_and_the_package_never_imports_them():
    edges = _imports(_modules())
    assert {t for m, targets in edges.items() if m.startswith("pipelines.") for t in targets} >= {"scmm_atlas.cli"}
    assert not [f"{m} -> {t}" for m, targets in edges.items() if m.startswith("scmm_atlas")
                for t in targets if t.startswith("pipelines")]


def test_the_wheel_lists_every_subpackage_and_maps_configs_into_the_package():
    """pyproject.toml names the packages one by one (configs/ is mapped into scmm_atlas): a new
    subpackage left off the list would be missing from the wheel."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for root in (PACKAGE, PIPELINES)
             for p in root.rglob("__init__.py")}
    assert set(setup["packages"]) == found | {"scmm_atlas.configs"}
    assert setup["package-dir"] == {"scmm_atlas.configs": "configs"}


def test_no_function_longer_than_a_screen_outside_the_benches():
    long = []
    for name, path in _modules().items():
        if _layer(name) == "bench":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}: {node.name} ({lines} lines)")
    assert long == []


def test_the_package_exports_its_public_api_on_first_use() -> None:
    """``import scmm_atlas`` stays light (a Ray worker's setup hook imports it); the names load when asked."""
    import subprocess
    import sys

    code = ("import sys, scmm_atlas; "
            "light = not any(m.startswith(('scmm_atlas.store', 'torch')) for m in sys.modules); "
            "from scmm_atlas.store import open_store; from scmm_atlas.data.dataset import StoreDataset; "
            "assert scmm_atlas.open_store is open_store and scmm_atlas.StoreDataset is StoreDataset; "
            "assert callable(scmm_atlas.results.open) and scmm_atlas.load_config('atlas_cite').train.epochs > 0; "
            "assert set(scmm_atlas.__all__) <= set(dir(scmm_atlas)); print(light)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]
