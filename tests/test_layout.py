"""The house rules that keep the code base readable (SPEC §17; issue 9), checked on every run:
the package's imports point down the data flow, and the tests share fixtures and fakes through
``conftest.py``, ``fakes.py`` and ``builders.py`` instead of importing each other."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "memd"
TESTS = REPO / "tests"

#: memd's layers, lowest first: a module may import its own layer and the layers before it.
LAYERS = (
    "leaf",  # clock, errors, logging, config, faults, jsonish: no memd imports but leaves
    "rollout",
    "store",
    "ingest",
    "schedule",
    "llm",
    "memory",
    "extract",
    "consolidate",
    "read",
    "service",
    "bench",
    "daemon",
    "top",  # cli, doctor, status, forget, __main__
)
LEAVES = {"clock", "errors", "logging", "config", "faults", "jsonish", "__init__", "__version__"}
#: Imports allowed against the order: the redactor is a pure function of text with no memd import,
#: and the memory layer runs every file it writes through it (SPEC §14).
ALLOWED_UPWARD = {("memory", "memd.extract.redact")}
TOP = {"cli", "doctor", "status", "forget", "__main__"}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) < 2:
        return "top"
    name = parts[1]
    if name in LEAVES:
        return "leaf"
    return "top" if name in TOP else name


def _runtime_imports(tree: ast.Module) -> list[str]:
    """``memd`` modules imported outside ``if TYPE_CHECKING:`` blocks (``from memd.x import y``,
    ``from memd import x`` and ``import memd.x``). Relative imports are refused by
    :func:`test_no_relative_imports`, so they need no resolving here."""
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "memd":
                found += [f"memd.{alias.name}" for alias in node.names]
            elif node.module.startswith("memd."):
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("memd.")]
    return found


def test_the_import_reader_sees_every_form() -> None:
    tree = ast.parse(
        "import memd.read.mcp\nfrom memd.store import db\nfrom memd import daemon\nimport json\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import memd.cli\n"
    )
    assert _runtime_imports(tree) == ["memd.read.mcp", "memd.store", "memd.daemon"]


def test_no_relative_imports() -> None:
    """Every import names its module in full, so the layer check reads each one."""
    relative = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    ]
    assert relative == []


def test_imports_point_down_the_data_flow() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("memd", *path.relative_to(PACKAGE).with_suffix("").parts))
        source = _layer(module)
        for target in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if LAYERS.index(_layer(target)) > LAYERS.index(source) and (source, target) not in ALLOWED_UPWARD:
                upward.append(f"{module} ({source}) imports {target} ({_layer(target)})")
    assert upward == []


def test_only_the_daemon_and_the_cli_wire_components() -> None:
    """The factory that builds every component is used by daemon.py and cli.py only (the bench
    gets it handed in)."""
    users = sorted(
        str(path.relative_to(REPO))
        for path in PACKAGE.rglob("*.py")
        if any(
            isinstance(node, ast.ImportFrom | ast.FunctionDef | ast.AsyncFunctionDef)
            and "build_components" in ([a.name for a in node.names] if isinstance(node, ast.ImportFrom) else [node.name])
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        )
    )
    assert users == ["memd/cli.py", "memd/daemon.py"]


def test_no_test_module_imports_another() -> None:
    offenders = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(name.startswith("tests.test_") for name in names):
                offenders.append(path.name)
    assert offenders == []


def test_no_fixture_is_defined_in_several_files() -> None:
    defined: dict[str, list[str]] = {}
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
                "fixture" in ast.unparse(d) for d in node.decorator_list
            ):
                defined.setdefault(node.name, []).append(path.name)
    assert {name: files for name, files in defined.items() if len(files) > 1} == {}
