"""The package layout is the data flow: a folder imports only the folders before it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "renacerd"

# In import order: each entry may import itself and every entry before it, never one after
# (the shared definitions first: escaping, the record layout, the chunk columns, syscall
# names and the CUDA hook table are used by every stage).
LAYERS: list[set[str]] = [
    {"", "escaping", "records", "columns", "syscall_table", "cuda", "_hot"},
    {"client"},
    {"trace"},
    {"store"},
    {"capture"},
    {"serve"},
    {"compare"},
    {"io", "sinks", "reports"},
    {"integrations", "cli", "__init__", "experiment_span"},  # the public facades
]


def _unit(module: str) -> str:
    """The top-level unit (folder or shared module) a dotted renacerd module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""  # "renacerd" itself: the version


def _rank(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"renacerd.{unit} is in no layer of tests/unit/test_layout.py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every renacerd module this file imports, at load time or inside a function."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "renacerd" or node.module.startswith("renacerd."):
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("renacerd")]
    return out


def test_no_module_imports_a_later_stage() -> None:
    """Capture never imports serve, the store never imports capture, and so on."""
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        own = _rank(_unit(".".join(rel.parts)))
        for line, target in _imports(path):
            if _rank(_unit(target)) > own:
                bad.append(f"{rel}.py:{line} imports {target}")
    assert bad == []


def test_the_client_needs_only_orjson() -> None:
    """renacerd.client imports the standard library, orjson and itself (the stated rule)."""
    import sys

    allowed = set(sys.stdlib_module_names) | {"orjson", "renacerd"}
    bad = []
    for path in sorted((PACKAGE / "client").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                top = name.split(".")[0]
                if top not in allowed or name.startswith("renacerd.") and not name.startswith(
                    "renacerd.client"
                ):
                    bad.append(f"{path.name}:{node.lineno} imports {name}")
    assert bad == []


def test_renacerd_through_the_service_imports_neither_numpy_psutil_nor_bcc() -> None:
    """`renacerd -- CMD` with the service up is mostly its imports: it loads the command
    module, the protocol and argparse only (0.12 s end to end, against ~0.5 s with numpy)."""
    import subprocess
    import sys

    code = ("import sys, renacerd.cli.renacerd_main, renacerd.serve.launch\n"
            "heavy = {'numpy', 'psutil', 'bcc', 'zstandard', 'cxxfilt'}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PACKAGE.parent, check=True).stdout
    assert out.strip() == "[]"
