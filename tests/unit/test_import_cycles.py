"""No import cycle anywhere in the engine, inside a layer too (test_layers.py checks only the
direction between layers). Imports inside functions, methods and ``if TYPE_CHECKING:`` blocks
count: an import moved into a function to dodge the cycle at load time still ties the two
modules together."""
import ast
import pathlib

ENGINE = pathlib.Path(__file__).resolve().parents[2] / 'plugins' / 'module_utils' / '_engine'


def module_names(root):
    """Every module under ``root`` by its dotted name relative to ``root`` (a package's
    ``__init__.py`` by the package's name), mapped to its file."""
    modules = {}
    for path in sorted(root.rglob('*.py')):
        parts = list(path.relative_to(root).with_suffix('').parts)
        if parts[-1] == '__init__':
            parts.pop()
        if parts:
            modules['.'.join(parts)] = path
    return modules


def import_graph(root):
    """The modules each module under ``root`` imports, from every relative import in its AST
    (at any depth: functions, methods, ``if TYPE_CHECKING:``). Absolute imports leave the
    package (test_layers.py forbids the engine from importing itself through Ansible's path).

    ``from P import name`` is an import of module ``P.name`` when that is a module, else of
    ``P`` itself."""
    modules = module_names(root)
    graph = {}
    for name, path in modules.items():
        # the package relative imports resolve against: the module's own for a package
        package = name.split('.') if path.name == '__init__.py' else name.split('.')[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or node.level == 0:
                continue
            base = package[:len(package) - (node.level - 1)]
            source = '.'.join(base + [part for part in (node.module or '').split('.') if part])
            for alias in node.names:
                submodule = f'{source}.{alias.name}' if source else alias.name
                targets.add(submodule if submodule in modules else source)
        graph[name] = targets & modules.keys() - {name}
    return graph


def cycles(graph):
    """Every elementary cycle of ``graph`` as a chain ``a -> b -> a``, starting at its
    alphabetically first module so each cycle is named once."""
    found = set()

    def walk(start, node, path):
        for target in sorted(graph.get(node, ())):
            if target == start:
                found.add(' -> '.join(path + [start]))
            elif target > start and target not in path:
                walk(start, target, path + [target])

    for start in sorted(graph):
        walk(start, start, [start])
    return found


def test_the_engine_has_no_import_cycle():
    unexpected = sorted(cycles(import_graph(ENGINE)))
    assert not unexpected, ('import cycles in the engine (move what both modules need into a '
                            'module below them):\n' + '\n'.join(unexpected))


def write_package(root, files):
    for relpath, text in files.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_graph_counts_imports_in_functions_methods_and_type_checking_blocks(tmp_path):
    write_package(tmp_path, {
        '__init__.py': '',
        'a.py': 'def load():\n    from .b import thing\n    return thing\n',
        'b.py': 'class B:\n    def method(self):\n        from .sub import c\n',
        'sub/__init__.py': '',
        'sub/c.py': ('from typing import TYPE_CHECKING\n'
                     'if TYPE_CHECKING:\n    from ..a import load\n'),
    })
    assert import_graph(tmp_path) == {'a': {'b'}, 'b': {'sub.c'}, 'sub': set(),
                                      'sub.c': {'a'}}
    assert cycles(import_graph(tmp_path)) == {'a -> b -> sub.c -> a'}


def test_the_graph_resolves_from_dot_import_to_the_module_or_the_package(tmp_path):
    write_package(tmp_path, {
        'pkg/__init__.py': 'VALUE = 1\n',
        'pkg/x.py': 'from . import y\nfrom . import VALUE\nimport os\nfrom os import path\n',
        'pkg/y.py': 'from .. import top\n',
        'top.py': 'from .pkg import x\n',
    })
    assert import_graph(tmp_path) == {'pkg': set(), 'pkg.x': {'pkg', 'pkg.y'},
                                      'pkg.y': {'top'}, 'top': {'pkg.x'}}
    assert cycles(import_graph(tmp_path)) == {'pkg.x -> pkg.y -> top -> pkg.x'}


def test_two_cycles_through_one_module_are_both_found(tmp_path):
    write_package(tmp_path, {
        'run/__init__.py': '',
        'run/restore.py': 'from .live_restore import run_live_restore\n',
        'run/live_restore.py': 'def plan():\n    from .restore import plan_restore\n',
        'run/verify.py': 'from .restore import plan_restore\n',
        'format/__init__.py': '',
        'format/qcow2.py': 'def chain():\n    from ..run import verify\n',
    })
    write_package(tmp_path, {'run/restore.py': 'from .live_restore import x\n'
                                               'from ..format import qcow2\n'})
    assert sorted(cycles(import_graph(tmp_path))) == [
        'format.qcow2 -> run.verify -> run.restore -> format.qcow2',
        'run.live_restore -> run.restore -> run.live_restore']
