"""Entry point: `python trainer/main.py --config FILE [key=value ...]` (also under `ray job submit`).

Works from a checkout with raytag installed (`make` does `pip install -e .`) and, for a plain
checkout without it, maps the folders onto the `raytag` namespace itself.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
# Running a file puts its folder first on sys.path; our module names (data, config, ...) must
# not shadow other packages, so take it off.
if sys.path and Path(sys.path[0] or ".").resolve() == _here:
    sys.path.pop(0)

try:
    import raytag.trainer  # noqa: F401  (installed: pip install -e . / pip install raytag)
except ImportError:
    import importlib.util
    import types

    _root = _here.parent
    _pkg = types.ModuleType("raytag")
    _pkg.__path__ = []
    sys.modules["raytag"] = _pkg
    for _name in ("trainer", "launcher", "cluster"):
        _spec = importlib.util.spec_from_file_location(
            f"raytag.{_name}", _root / _name / "__init__.py", submodule_search_locations=[str(_root / _name)]
        )
        assert _spec is not None and _spec.loader is not None
        _mod = importlib.util.module_from_spec(_spec)
        sys.modules[_spec.name] = _mod
        _spec.loader.exec_module(_mod)
        setattr(_pkg, _name, _mod)

from raytag.launcher.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
