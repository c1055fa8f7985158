"""The package's layering, checked on the source: algo/ states the algorithm and its interfaces
and imports nothing from the layers that implement or drive it (parallel/, train/, the CLI)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mpl_fast"
FORBIDDEN_IN_ALGO = ("mpl_fast.parallel", "mpl_fast.train", "mpl_fast.cli", "mpl_fast.config")


def _imports(source: str, path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``source`` (the text of ``path``), at any depth:
    function-level imports included, relative ones resolved against the file's package."""
    found = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-node.level])
                module = f"{base}.{module}" if module else base
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def _forbidden(source: str, path: pathlib.Path) -> list[str]:
    return [f"{path.name}:{line} imports {module}" for line, module in _imports(source, path)
            if module.startswith(FORBIDDEN_IN_ALGO)]


def test_algo_imports_nothing_from_parallel_train_or_the_cli():
    files = sorted((PACKAGE / "algo").glob("*.py"))
    assert len(files) > 5
    bad = [msg for path in files for msg in _forbidden(path.read_text(), path)]
    assert bad == [], bad


def test_the_rule_catches_imports_at_any_depth():
    source = ("def f():\n    from mpl_fast.parallel import sharding\n"
              "from ..train import build\nimport mpl_fast.cli\nfrom mpl_fast import config\n")
    bad = _forbidden(source, PACKAGE / "algo" / "mpl.py")
    assert {int(msg.split(":")[1].split()[0]) for msg in bad} == {2, 3, 4, 5}, bad
