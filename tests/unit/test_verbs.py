"""Issue 21, step 3: one verb shape (run/<module>.py: run_<module>(<Module>Request)), one opener
of a guest's backups (run/opener.py), one module of node paths (paths.py) and one reader and
writer of the node's files (config/files.py)."""
import dataclasses
import importlib
import os
import pathlib
from datetime import datetime, timedelta, timezone

import pytest

from guestvault_engine import paths
from guestvault_engine.config.files import declare_file, read_text
from guestvault_engine.errors import ConfigError, LockTimeout
from guestvault_engine.run.guest_backup import GuestBackupRequest
from guestvault_engine.run.opener import open_backups
from guestvault_engine.run.protect import ProtectRequest
from guestvault_engine.run.prune import PruneRequest
from guestvault_engine.run.request import Request
from guestvault_engine.run.verify import VerifyRequest
from guestvault_engine.storage.directory import DirStorage
from guestvault_engine.times import format_time

MODULES = pathlib.Path(__file__).resolve().parents[2] / 'plugins' / 'modules'
T = datetime(2026, 3, 10, 1, 0, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize('module', sorted(p.stem for p in MODULES.glob('*.py')))
def test_every_module_calls_the_verb_of_its_name_with_its_request(module):
    run = importlib.import_module(f'guestvault_engine.run.{module}')
    request = getattr(run, ''.join(word.capitalize() for word in module.split('_')) + 'Request')
    assert dataclasses.is_dataclass(request) and issubclass(request, Request)
    assert callable(getattr(run, f'run_{module}'))
    # the module is its docs, its argument spec and this one call
    assert (f"run_module({module}_argument_spec(), run_{module}, {request.__name__}"
            in (MODULES / f'{module}.py').read_text())


def test_a_request_takes_the_module_parameters_it_knows_and_check_mode():
    params = {'vmid': 101, 'backup': 'latest', 'protected': True, 'notes': None,
              'storage': 'nfs', 'dumpdir': None, 'config_dir': '/etc/gv', 'lockwait': 5.0,
              'path': 'an alias the request does not know'}
    assert ProtectRequest.from_params(params, check_mode=True) == ProtectRequest(
        101, 'latest', True, None, 'nfs', None, '/etc/gv', 5.0, check_mode=True)


def test_requests_that_shape_module_parameters_say_how():
    prune = PruneRequest.from_params({
        'vmid': None, 'storage': 'nfs', 'dumpdir': None, 'config_dir': '/etc/gv',
        'prune_backups': None, 'timezone': None, 'lockwait': 180, 'simulate': None,
        'keep_last': 3, 'keep_daily': None})
    assert prune.prune_backups == {'keep_last': 3}
    assert VerifyRequest.from_params({'vmid': 101}).fail is True      # a playbook stops there
    backup = GuestBackupRequest.from_params({'vmid': 101, 'performance': {'max_workers': 4}})
    assert backup.max_workers == 4


@pytest.fixture
def store(tmp_path):
    """Guest 100 on a dumpdir: a good backup at T, a damaged one (torn manifest) at T+1h."""
    (tmp_path / 'store').mkdir()
    storage = DirStorage(str(tmp_path / 'store'))
    for hours in range(2):
        when = T + timedelta(hours=hours)
        with storage.guest_lock(100, 0):
            staged = storage.stage(100, when)
        staged.write_json('index.json', {'vmid': 100, 'time': format_time(when),
                                         'level': 'full', 'disks': []})
        staged.commit()
    newest = os.path.join(storage.guest_dir(100), format_time(T + timedelta(hours=1)))
    with open(os.path.join(newest, 'index.json'), 'w') as handle:
        handle.write('{"vmid": 100, "ti')
    return storage


def test_the_opener_locks_the_guest_privately_and_resolves_latest_with_a_warning(store):
    request = ProtectRequest(100, dumpdir=store.path, lockwait=0)
    with open_backups(request, 'protect', shared=False) as opened:
        assert opened.vmid == 100 and opened.storage.path == store.path
        assert opened.record.index['time'] == format_time(T)
        [warning] = opened.warnings
        assert 'vm/100/2026-03-10T02:00:00Z' in warning and 'not valid JSON' in warning
        umask = os.umask(0)
        os.umask(umask)
        assert umask == 0o077
        with pytest.raises(LockTimeout, match='protect of guest 100 is running'):
            with store.guest_lock(100, 0, shared=True):
                pass
    with store.guest_lock(100, 0):               # released
        pass


def test_the_opener_checks_the_vmid_before_the_storage_and_resolves_on_request(store):
    with pytest.raises(ConfigError, match='vmid'):
        with open_backups(ProtectRequest(5, dumpdir='relative/dir'), 'protect', shared=True):
            pass
    request = ProtectRequest(100, backup=format_time(T), dumpdir=store.path)
    with open_backups(request, 'protect', shared=True, resolve=False) as opened:
        assert opened.record is None
        assert opened.resolve().index['time'] == format_time(T) and opened.warnings == []


def test_each_node_path_has_its_override(monkeypatch, tmp_path):
    for variable, function, default in (
            ('GUESTVAULT_CONFIG_DIR', paths.default_config_dir, '/etc/guestvault'),
            ('GUESTVAULT_FLEECING_DIR', paths.fleecing_dir, '/var/lib/guestvault/fleecing'),
            ('GUESTVAULT_APPLIANCE_CACHE', paths.appliance_cache,
             '/var/cache/guestvault/appliance'),
            ('GUESTVAULT_STATE_DIR', paths.state_dir, '/var/lib/guestvault/jobs')):
        monkeypatch.delenv(variable, raising=False)
        assert function() == default
        monkeypatch.setenv(variable, str(tmp_path / variable))
        assert function() == str(tmp_path / variable)
    for variable, function in (('GUESTVAULT_RUN_DIR', paths.run_dir),
                               ('GUESTVAULT_WORK_DIR', paths.work_dir)):
        monkeypatch.setenv(variable, str(tmp_path / variable))
        assert function() == str(tmp_path / variable)
        assert os.stat(tmp_path / variable).st_mode & 0o777 == 0o700 & ~_umask()


def _umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_a_node_file_is_read_or_absent_and_an_unreadable_one_is_named(tmp_path):
    assert read_text(str(tmp_path / 'storage.cfg')) is None
    (tmp_path / 'jobs.cfg').mkdir()
    with pytest.raises(ConfigError, match=f'cannot read {tmp_path}/jobs.cfg'):
        read_text(str(tmp_path / 'jobs.cfg'))


def test_a_declared_file_is_written_whole_in_a_new_directory_or_removed(tmp_path):
    path = tmp_path / 'etc' / 'guests.d' / '101.conf'
    declare_file(str(path), 'qmp: /run/101.qmp\n', mode=0o600)
    assert path.read_text() == 'qmp: /run/101.qmp\n'
    assert path.stat().st_mode & 0o777 == 0o600
    assert os.listdir(path.parent) == ['101.conf']       # no temporary left beside it
    declare_file(str(path), None)
    assert not path.exists()
    declare_file(str(path), None)                        # already absent: nothing to do
