"""The packages' import direction (README, Architecture): `launcher/` may import `trainer/` and
`cluster/`; `trainer/` imports neither `launcher/` nor Ray; `cluster/` imports neither `trainer/`
nor `launcher/`. Read from the source with `ast`, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGES = ("trainer", "launcher", "cluster")

# What each package must not import (a module, or any module below it).
FORBIDDEN = {
    "trainer": ("raytag.launcher", "ray"),  # models, data, DeepSpeed, metrics: nothing of Ray's
    "cluster": ("raytag.trainer", "raytag.launcher", "ray"),  # where bytes live and things run
    "launcher": (),
}
# trainer/main.py is the script users call (`python trainer/main.py`, `ray job submit -- python
# trainer/main.py`): a thin call into the command line, which lives in launcher/.
ENTRY_POINTS = {("trainer", "main.py"): ("raytag.launcher.cli",)}


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved against
    `raytag.<package>`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    here = ["raytag", package]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                if node.module:
                    out.append((node.lineno, ".".join([*base, node.module])))
                else:  # `from . import dist`: the names are modules of the package
                    out += [(node.lineno, ".".join([*base, a.name])) for a in node.names]
            elif node.module:
                out.append((node.lineno, node.module))
    return out


def violations(root: Path) -> list[str]:
    """Every import against the direction, as 'file:line imports module'."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            allowed = ENTRY_POINTS.get((package, path.name), ())
            for line, module in imported_modules(path, package):
                for bad in FORBIDDEN[package]:
                    if (module == bad or module.startswith(bad + ".")) and module not in allowed:
                        found.append(f"{path.relative_to(root)}:{line} imports {module}")
    return found


def test_imports_run_one_way():
    assert violations(ROOT) == []


def test_the_check_sees_imports_against_the_direction(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "trainer" / "a.py").write_text(
        "import os\nfrom ..launcher import cli\n\ndef f():\n    import ray.train\n"
    )
    (tmp_path / "trainer" / "main.py").write_text("from raytag.launcher.cli import main\n")
    (tmp_path / "cluster" / "b.py").write_text("from raytag.trainer.config import Config\n")
    (tmp_path / "launcher" / "c.py").write_text("import ray\nfrom raytag.trainer import loop\n")
    assert violations(tmp_path) == [
        "trainer/a.py:2 imports raytag.launcher",
        "trainer/a.py:5 imports ray.train",
        "cluster/b.py:1 imports raytag.trainer.config",
    ]
