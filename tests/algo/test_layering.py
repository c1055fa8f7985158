"""The package's layering, checked on the source: algo/ states the algorithm and its interfaces
and imports nothing from the layers that implement or drive it (parallel/, train/, the CLI)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "mpl_fast"
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


# Imports torch once, then imports each module first in a forked child (mpl_fast not yet loaded).
_FORKED_IMPORTS = """
import os, sys, torch
failed = []
for module in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(module)
        except BaseException as exc:
            print(module, type(exc).__name__, exc, file=sys.stderr)
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(module)
print(failed)
"""


def test_every_module_imports_first_in_a_fresh_process():
    """No import cycle: each module, imported first in a new interpreter, loads (a cycle through
    a package's __init__ shows only for some import orders, e.g. mpl_fast.optim first)."""
    import os
    import subprocess
    import sys

    modules = sorted(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
                     for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", _FORKED_IMPORTS, *modules], cwd=PACKAGE.parent,
                          env={**os.environ, "MPL_FAST_NO_EXTENSION": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert len(modules) > 30 and proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
