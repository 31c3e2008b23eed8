"""Shared test set-up: the engine as ``guestvault_engine``, the lab tools on sys.path.

``plugins/module_utils/_engine`` uses relative imports only, so loading it as a package under a
short name lets tests import it without Ansible's collection loader, exactly as the node command
does (tools/engine_loader.py).
"""
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from engine_loader import load_engine  # noqa: E402

load_engine()

# The file-restore appliance is built once per package versions into the tree (as the Linux
# test guest is), not into /var/cache; modules run through Ansible inherit this too.
os.environ.setdefault('GUESTVAULT_APPLIANCE_CACHE', str(ROOT / '.build' / 'appliance'))
