"""Run the collection's modules as users do: a real ``ansible``/``ansible-playbook`` process.

Plain helpers shared by the module tests; the pytest fixtures that wrap them (``callback_dir``,
``installed_collection``, ``ansible``) live in ``conftest.py``.

The modules run from the installed collection (``make collection``), never from the source tree.
Results are read through a small stdout callback that writes each task result as one JSON line
(ansible-core 2.19 no longer ships a ``json`` callback).
"""
import ast
import json
import os
import pathlib
import subprocess
import sys

import yaml

from procs import run_bounded

ROOT = pathlib.Path(__file__).resolve().parents[2]
# One ansible/ansible-playbook call on localhost took 3-5 s on a busy day here, a playbook of
# several tasks longer; the limit only stops a hung one (and its whole process tree).
TIMEOUT = 300
COLLECTIONS = os.environ.get('ANSIBLE_COLLECTIONS_PATH') or str(ROOT / '.build' / 'collections')
INSTALLED = pathlib.Path(COLLECTIONS.split(os.pathsep)[0]) / 'ansible_collections' / 'guestvault' \
    / 'backup'
BIN = pathlib.Path(sys.executable).parent
PYTHON = str(ROOT / '.venv' / 'bin' / 'python') if (ROOT / '.venv').is_dir() else sys.executable

CALLBACK = '''
from __future__ import annotations

DOCUMENTATION = """
    name: gv_result_lines
    type: stdout
    short_description: each task result as one JSON line in $GV_RESULT_FILE (guestvault tests)
    description: For tests; warnings and deprecations are flattened to their messages.
"""

import json
import os

from ansible.plugins.callback import CallbackBase


def _messages(items):
    return [getattr(getattr(item, 'event', None), 'msg', None) or str(item) for item in items]


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = 'stdout'
    CALLBACK_NAME = 'gv_result_lines'

    def _record(self, result, status):
        data = dict(result.result)
        if 'warnings' in data:
            data['warnings'] = _messages(result.warnings)
        data['deprecations'] = _messages(result.deprecations)
        data['_status'] = status
        data['_task'] = result.task_name
        with open(os.environ['GV_RESULT_FILE'], 'a') as handle:
            handle.write(json.dumps(data, default=str) + '\\n')

    def v2_runner_on_ok(self, result):
        self._record(result, 'ok')

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, 'failed')

    def v2_runner_on_unreachable(self, result):
        self._record(result, 'unreachable')

    def v2_runner_on_skipped(self, result):
        self._record(result, 'skipped')
'''


def write_callback(directory):
    """Put the JSON-lines stdout callback into ``directory``; returns it as a string."""
    (pathlib.Path(directory) / 'gv_result_lines.py').write_text(CALLBACK)
    return str(directory)


def stale_collection_files():
    """Source files under plugins/ that the installed collection lacks or has in another version;
    None when the collection is not installed at all."""
    if not INSTALLED.is_dir():
        return None
    return [str(src.relative_to(ROOT)) for src in sorted((ROOT / 'plugins').rglob('*.py'))
            if not (INSTALLED / src.relative_to(ROOT)).is_file()
            or (INSTALLED / src.relative_to(ROOT)).read_bytes() != src.read_bytes()]


class Unsafe(str):
    """A playbook value Ansible must not template (written as ``!unsafe``)."""


class _PlaybookDumper(yaml.SafeDumper):
    pass


_PlaybookDumper.add_representer(
    Unsafe, lambda dumper, value: dumper.represent_scalar('!unsafe', str(value), style="'"))


class Ansible:
    """Runs modules the way users do, each call a fresh ``ansible``/``ansible-playbook``."""

    def __init__(self, workdir, callback_dir):
        self.workdir = workdir
        self.callback_dir = callback_dir
        self.calls = 0

    def _env(self, result_file):
        env = dict(os.environ)
        # The autouse private_run_dir fixture puts the node locks in this test's directory.
        assert env.get('GUESTVAULT_RUN_DIR'), 'GUESTVAULT_RUN_DIR must reach the module'
        env.update(ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_CALLBACK_PLUGINS=self.callback_dir,
                   ANSIBLE_STDOUT_CALLBACK='gv_result_lines', ANSIBLE_LOAD_CALLBACK_PLUGINS='1',
                   ANSIBLE_NOCOLOR='1', ANSIBLE_LOCALHOST_WARNING='0',
                   ANSIBLE_INVENTORY_UNPARSED_WARNING='0', GV_RESULT_FILE=result_file)
        env.pop('ANSIBLE_CONFIG', None)
        return env

    def _run(self, argv):
        self.calls += 1
        result_file = os.path.join(self.workdir, f'results-{self.calls}.jsonl')
        try:
            proc = run_bounded(argv, TIMEOUT, cwd=self.workdir, env=self._env(result_file),
                               capture_output=True, text=True)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{' '.join(argv)}: still running after {TIMEOUT} s, its "
                                 f"processes killed:\n{exc.output or ''}\n{exc.stderr or ''}") from None
        try:
            with open(result_file) as handle:
                results = [json.loads(line) for line in handle]
        except FileNotFoundError:
            results = []
        assert results, f"no task result (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        for result in results:
            result['_rc'] = proc.returncode
            result['_stderr'] = proc.stderr
        return results

    def module(self, name, args, check=False, diff=False):
        """``ansible localhost -m NAME -a ARGS``; the task's result.

        ``args`` is a dict (passed as JSON, types kept) or a string as users type it ad hoc
        (``"vmid=101 dumpdir=/srv/backup"``).
        """
        argv = [str(BIN / 'ansible'), 'localhost', '-i', 'localhost,', '-c', 'local',
                '-e', f'ansible_python_interpreter={PYTHON}', '-m', name,
                '-a', args if isinstance(args, str) else json.dumps(args)]
        argv += ['--check'] if check else []
        argv += ['--diff'] if diff else []
        (result,) = self._run(argv)
        return result

    def playbook(self, tasks):
        """One play on localhost with ``tasks``; the results of the tasks that ran."""
        path = os.path.join(self.workdir, f'play-{self.calls + 1}.yml')
        with open(path, 'w') as handle:
            yaml.dump([{'hosts': 'localhost', 'gather_facts': False, 'tasks': tasks}], handle,
                      Dumper=_PlaybookDumper, sort_keys=False)
        return self._run([str(BIN / 'ansible-playbook'), '-i', 'localhost,', '-c', 'local',
                          '-e', f'ansible_python_interpreter={PYTHON}', path])


# ----------------------------------------------------------------------------- checking results

def tree(path):
    """Every file and directory under ``path``, relative, with file sizes; None if absent."""
    if not os.path.exists(path):
        return None
    found = []
    for base, dirs, files in os.walk(path):
        rel = os.path.relpath(base, path)
        rel = '' if rel == '.' else rel
        found += [(os.path.join(rel, d), 'dir') for d in dirs]
        found += [(os.path.join(rel, f), os.path.getsize(os.path.join(base, f))) for f in files]
    return sorted(found)


def assert_failed_with(result, *words):
    """A deliberate failure (fail_json, not a crash) whose message has all of ``words``."""
    assert result['_status'] == 'failed', result
    assert result['_rc'] != 0
    assert 'module_stderr' not in result and 'Traceback' not in result['_stderr'], result
    # ansible-core 2.19 reports an uncaught exception as 'Task failed: Module failed: <error>'
    # without the 'invocation' that every fail_json result carries.
    assert 'invocation' in result and not result['msg'].startswith('Task failed:'), result
    for word in words:
        assert word in result['msg'], f"{word!r} not in {result['msg']!r}"


def documented_return(module):
    """The installed module's RETURN, parsed."""
    source = (INSTALLED / 'plugins' / 'modules' / f'{module}.py').read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and node.targets[0].id == 'RETURN':
            return yaml.safe_load(node.value.value)
    raise AssertionError(f'{module} has no RETURN')
