"""The engine (plugins/module_utils/_engine) as the package ``guestvault_engine``, without
Ansible's collection loader: how the tests and the benchmarks import it, as the node command's
launcher does on a node."""
import importlib.util
import os
import sys

ENGINE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          'plugins', 'module_utils', '_engine')


def load_engine():
    """Import the engine once as ``guestvault_engine``; returns the package."""
    if 'guestvault_engine' not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            'guestvault_engine', os.path.join(ENGINE_DIR, '__init__.py'),
            submodule_search_locations=[ENGINE_DIR])
        package = importlib.util.module_from_spec(spec)
        sys.modules['guestvault_engine'] = package
        spec.loader.exec_module(package)
    return sys.modules['guestvault_engine']
