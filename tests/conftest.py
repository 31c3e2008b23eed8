"""Shared test set-up: the engine as ``guestvault_engine``, the lab tools on sys.path.

``plugins/module_utils/_engine`` uses relative imports only, so loading it as a package under a short
name lets tests import it without Ansible's collection loader, exactly as the node command does.
"""
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENGINE_DIR = ROOT / "plugins" / "module_utils" / "_engine"

if "guestvault_engine" not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        "guestvault_engine", ENGINE_DIR / "__init__.py",
        submodule_search_locations=[str(ENGINE_DIR)])
    _package = importlib.util.module_from_spec(_spec)
    sys.modules["guestvault_engine"] = _package
    _spec.loader.exec_module(_package)

sys.path.insert(0, str(ROOT / "tools"))
