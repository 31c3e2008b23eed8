"""No module returns a key Ansible reads with its own meaning (issue 20: file_restore's
``skipped``, the devices it did not extract, made Ansible report a task that wrote files as
skipped). ``changed`` and ``msg`` may be returned, with Ansible's meaning only."""
import ast
import pathlib

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODULES = sorted((ROOT / 'plugins' / 'modules').glob('*.py'))
RUN_LAYER = sorted((ROOT / 'plugins' / 'module_utils' / '_engine' / 'run').glob('*.py'))
# keys of a task result that Ansible itself interprets (ansible-core's TaskResult and
# TaskExecutor): a true ``skipped`` or ``failed``, a non-zero ``rc``, ``unreachable``, a loop's
# ``results``, and its own bookkeeping
RESERVED = {'skipped', 'failed', 'rc', 'unreachable', 'results', 'invocation', 'exception',
            'deprecations', 'failed_when_result', 'skip_reason'}
MEANING = {'changed': 'bool', 'msg': 'str'}


def reserved(key):
    return key in RESERVED or key.startswith(('ansible_', '_ansible'))


def documented_return(path):
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and node.targets[0].id == 'RETURN':
            return yaml.safe_load(node.value.value) or {}
    raise AssertionError(f'{path.name} has no RETURN')


@pytest.mark.parametrize('path', MODULES, ids=lambda path: path.stem)
def test_no_module_documents_a_key_ansible_reads_otherwise(path):
    returned = documented_return(path)
    assert not [key for key in returned if reserved(key)], path.name
    for key, kind in MEANING.items():
        if key in returned:
            assert returned[key]['type'] == kind, f"{path.name}: {key} is not Ansible's"


def result_keys(tree):
    """String keys the code puts into dicts: literals, dict(...)/.update(...)/.setdefault(...)
    keywords, and ``x['key'] = ...``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            yield from ((key.value, node.lineno) for key in node.keys
                        if isinstance(key, ast.Constant) and isinstance(key.value, str))
        elif isinstance(node, ast.Call):
            name = getattr(node.func, 'attr', None) or getattr(node.func, 'id', None)
            if name in ('dict', 'update', 'setdefault'):
                yield from ((keyword.arg, node.lineno) for keyword in node.keywords
                            if keyword.arg)
            if name == 'setdefault' and node.args and isinstance(node.args[0], ast.Constant):
                yield node.args[0].value, node.lineno
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store) \
                and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            yield node.slice.value, node.lineno


@pytest.mark.parametrize('path', RUN_LAYER, ids=lambda path: path.stem)
def test_no_engine_result_uses_a_key_ansible_reads_otherwise(path):
    found = [f"{path.name}:{line} {key!r}" for key, line in result_keys(ast.parse(
        path.read_text())) if reserved(key)]
    assert not found, "keys Ansible interprets: " + ', '.join(found)


def test_the_scan_finds_such_a_key():
    code = "result.update(dest=d, skipped=names)\nout['rc'] = 1\nx = {'failed': 0}\n"
    assert sorted(key for key, _line in result_keys(ast.parse(code)) if reserved(key)) == [
        'failed', 'rc', 'skipped']
