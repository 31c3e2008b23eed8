"""The engine's layers point down only (docs/architecture.md): run -> restore | notify -> policy |
guest -> datastore -> format | config -> storage | images, with errors, vocabulary, times,
version and paths below everything. QMP command names live only in guest/, qemu-img only in
format/, and nothing in the engine imports Ansible."""
import ast
import pathlib
import re

import pytest

ENGINE = pathlib.Path(__file__).resolve().parents[2] / 'plugins' / 'module_utils' / '_engine'
RANK = {'run': 5, 'restore': 4, 'notify': 4, 'policy': 3, 'guest': 3, 'datastore': 2, 'format': 1,
        'config': 1, 'storage': 0, 'images': 0}
BASE = {'errors', 'vocabulary', 'times', 'version', 'paths'}
FILES = sorted(p for p in ENGINE.rglob('*.py'))


def layer(path):
    parts = path.relative_to(ENGINE).parts
    return parts[0] if len(parts) > 1 else None


def imported_layers(path):
    """The layers (or base modules) a file imports, from its relative imports."""
    tree = ast.parse(path.read_text())
    here = layer(path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert not (node.module or '').startswith('ansible'), f"{path}: imports Ansible"
                continue
            # resolve the import against the file's package (datastore/backends/x.py: '..' is
            # datastore, '...' the engine)
            package = list(path.relative_to(ENGINE).parts[:-1])
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            names = base + [part for part in (node.module or '').split('.') if part]
            found.add(names[0] if names else node.names[0].name)
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith('ansible') for a in node.names), path
    return found


@pytest.mark.parametrize('path', FILES, ids=lambda p: str(p.relative_to(ENGINE)))
def test_imports_point_down_only(path):
    here = layer(path)
    for target in imported_layers(path) - BASE - {here}:
        assert here is not None, f"base module {path.name} imports layer {target}"
        assert RANK[target] < RANK[here], f"{path.relative_to(ENGINE)} ({here}) imports {target}"


def test_base_modules_import_only_base_modules():
    for name in BASE:
        assert imported_layers(ENGINE / f'{name}.py') <= BASE, name


# QMP command names as string literals ('stop' and 'cont' are left out: 'stop' is also a mode).
QMP_COMMAND = re.compile(r"""['"](query-[a-z-]+|block-[a-z-]+|blockdev-[a-z-]+|transaction|"""
                         r"""system_[a-z]+|nbd-server-[a-z]+|human-monitor-command)['"]""")


@pytest.mark.parametrize('path', [p for p in FILES if layer(p) != 'guest'],
                         ids=lambda p: str(p.relative_to(ENGINE)))
def test_no_qmp_command_outside_guest_and_no_qemu_img_outside_format(path):
    text = path.read_text()
    assert not re.search(r"\.execute\(", text), f"{path}: talks QMP outside guest/"
    if layer(path) != 'format':
        assert 'qemu_img_binary' not in text and "'qemu-img'" not in text, \
            f"{path}: runs qemu-img outside format/"
    match = QMP_COMMAND.search(text)
    assert match is None, f"{path}: names the QMP command {match.group(1)}"


def format_modules_imported(path):
    """The modules of format/ a file imports (``from ..format.base import x`` -> 'base')."""
    package = list(path.relative_to(ENGINE).parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            names = package[:len(package) - (node.level - 1)] + (node.module or '').split('.')
            names = [name for name in names if name]
            if names[:1] == ['format']:
                found.update(names[1:2] or [alias.name for alias in node.names])
    return found


@pytest.mark.parametrize('path', [p for p in FILES if layer(p) == 'datastore'],
                         ids=lambda p: str(p.relative_to(ENGINE)))
def test_the_datastore_uses_only_the_format_interface_and_qemu_img_from_format(path):
    # the Datastore is a Format (format/base.py) taking captures (format/capture.py) and restores
    # to qcow2 through qemu-img, which only format/qemu_img.py runs; the qcow2 chain and anything
    # else in format/ stay apart
    assert format_modules_imported(path) <= {'base', 'capture', 'qemu_img'}, path
