"""Jobs as declared state: jobs.cfg plus a systemd timer and service, idempotent, verified by
systemd itself (systemd-analyze), and the backup_job module as users run it."""
import os
import shutil
import subprocess

import pytest

from guestvault_engine.errors import ConfigError
from guestvault_engine.run.backup_job import apply_job
from guestvault_engine.policy.jobs_cfg import load_jobs

COMMAND = os.path.realpath(os.path.join(os.path.dirname(__file__), '..', '..', 'bin',
                                        'guestvault-dump'))
WEEKNIGHTS = {'schedule': 'mon..fri 23:00', 'all': True, 'storage': 'backup-nfs',
              'prune-backups': 'keep-daily=3,keep-weekly=2,keep-monthly=1', 'repeat-missed': True}


@pytest.fixture
def dirs(tmp_path):
    config_dir, unit_dir = tmp_path / 'etc', tmp_path / 'units'
    config_dir.mkdir()
    (config_dir / 'storage.cfg').write_text(f"dir: backup-nfs\n\tpath {tmp_path / 'nfs'}\n")
    return str(config_dir), str(unit_dir)


def apply(dirs, job_id, options=None, **kwargs):
    config_dir, unit_dir = dirs
    return apply_job(job_id, options, config_dir=config_dir, unit_dir=unit_dir,
                     command=COMMAND, manage_systemd=False, **kwargs)


def test_a_job_becomes_jobs_cfg_and_units_and_a_second_run_changes_nothing(dirs):
    first = apply(dirs, 'weeknights', WEEKNIGHTS)
    assert first['changed'] is True and len(first['units']) == 2
    timer = open(first['units'][0]).read()
    assert 'OnCalendar=' in timer and 'Persistent=true' in timer
    service = open(first['units'][1]).read()
    assert 'ExecStart=' + COMMAND + ' --job weeknights ' in service
    # A killed run is cleaned up when its service stops, not at the next night's run.
    assert 'ExecStopPost=' + COMMAND + ' --job weeknights --cleanup ' in service
    assert load_jobs(dirs[0])['weeknights'].options['repeat-missed'] is True
    assert apply(dirs, 'weeknights', WEEKNIGHTS)['changed'] is False
    changed = apply(dirs, 'weeknights', dict(WEEKNIGHTS, schedule='mon..fri 22:30'))
    assert changed['changed'] and '23:00' in changed['diff']['before']['job']
    assert '22:30' in changed['diff']['after']['job']


@pytest.mark.skipif(shutil.which('systemd-analyze') is None, reason='needs systemd-analyze')
def test_systemd_accepts_the_units_and_fires_when_the_engine_says(dirs):
    from guestvault_engine.policy.calendar import CalendarEvent
    result = apply(dirs, 'weeknights', WEEKNIGHTS)
    proc = subprocess.run(['systemd-analyze', 'verify', *result['units']],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    timer = open(result['units'][0]).read()
    specs = [line.split('=', 1)[1] for line in timer.splitlines()
             if line.startswith('OnCalendar=')]
    proc = subprocess.run(['systemd-analyze', 'calendar', '--iterations=5', *specs],
                          capture_output=True, text=True, check=True)
    assert specs and proc.stdout.count('Next elapse') == len(specs)    # each spec has a next one
    assert CalendarEvent.parse('mon..fri 23:00').next_events(
        '2026-11-20T12:00:00Z', 3, 'UTC')[0].weekday() == 4   # Friday 23:00 UTC first


def test_disabling_removes_the_timer_and_absent_removes_everything(dirs):
    apply(dirs, 'weeknights', WEEKNIGHTS)
    off = apply(dirs, 'weeknights', dict(WEEKNIGHTS, enabled=False))
    assert off['changed'] and off['units'] == [] and not os.listdir(dirs[1])
    assert load_jobs(dirs[0])['weeknights'].enabled is False
    gone = apply(dirs, 'weeknights', state='absent')
    assert gone['changed'] and load_jobs(dirs[0]) == {}
    assert apply(dirs, 'weeknights', state='absent')['changed'] is False


def test_check_mode_reports_and_writes_nothing(dirs):
    result = apply(dirs, 'weeknights', WEEKNIGHTS, check_mode=True)
    assert result['changed'] is True
    assert not os.path.exists(os.path.join(dirs[0], 'jobs.cfg'))
    assert not os.path.exists(dirs[1])


@pytest.mark.parametrize('options, words', [
    (dict(WEEKNIGHTS, schedule='mon..fri 25:00'), 'schedule'),
    (dict(WEEKNIGHTS, all=None, vmid=[101], exclude=[101]), 'both in vmid and in exclude'),
    ({'schedule': 'daily', 'storage': 'backup-nfs'}, 'selects no guest'),
    (dict(WEEKNIGHTS, storage='backup-s3'),
     "storage 'backup-s3' is not defined in"),
])
def test_bad_jobs_are_refused_and_nothing_is_written(dirs, options, words):
    with pytest.raises(ConfigError) as err:
        apply(dirs, 'nightly', options)
    assert words in str(err.value)
    assert not os.path.exists(os.path.join(dirs[0], 'jobs.cfg'))
    assert not os.path.exists(dirs[1])


def test_an_unknown_storage_is_only_a_warning_in_check_mode(dirs):
    # In a check-mode run of site.yml, vzdump_config has not written the storage yet.
    result = apply(dirs, 'nightly', dict(WEEKNIGHTS, storage='backup-s3'), check_mode=True)
    assert result['changed'] is True
    assert any("storage 'backup-s3' is not defined" in w and 'check mode' in w
               for w in result['warnings'])
    assert not os.path.exists(os.path.join(dirs[0], 'jobs.cfg'))


def test_the_backup_job_module_is_idempotent_and_warns_about_the_minute_trap(ansible, dirs):
    config_dir, unit_dir = dirs
    args = {'id': 'weeknights', 'schedule': 'mon..fri 23:00', 'all': True,
            'storage': 'backup-nfs', 'prune_backups': 'keep-daily=3,keep-weekly=2',
            'repeat_missed': True, 'config_dir': config_dir, 'unit_dir': unit_dir,
            'command': COMMAND}
    first = ansible.module('guestvault.backup.backup_job', args, diff=True)
    assert first['_status'] == 'ok' and first['changed'] is True, first
    assert 'vzdump: weeknights' in first['diff']['after']
    again = ansible.module('guestvault.backup.backup_job', args)
    assert again['changed'] is False
    trap = ansible.module('guestvault.backup.backup_job', dict(args, schedule='mon..fri 22'),
                          check=True)
    assert trap['changed'] is True and any('minute' in w for w in trap['warnings'])
    bad = ansible.module('guestvault.backup.backup_job', dict(args, schedule='mon..fri 25:00'))
    assert bad['_status'] == 'failed' and 'schedule' in bad['msg']
    unknown = ansible.module('guestvault.backup.backup_job', dict(args, storage='backup-s3'))
    assert unknown['_status'] == 'failed'
    assert "storage 'backup-s3' is not defined" in unknown['msg'] and 'backup-nfs' in unknown['msg']
    assert 'mon..fri 23:00' in open(os.path.join(config_dir, 'jobs.cfg')).read()


def test_the_module_sets_chain_period_which_the_node_command_reads(ansible, dirs):
    config_dir, unit_dir = dirs
    args = {'id': 'monthly', 'schedule': 'sun 01:00', 'vmid': [101], 'storage': 'backup-nfs',
            'level': 'auto', 'chain_period': 'monthly', 'config_dir': config_dir,
            'unit_dir': unit_dir, 'command': COMMAND}
    first = ansible.module('guestvault.backup.backup_job', args)
    assert first['_status'] == 'ok' and first['changed'] is True, first
    assert '\tchain-period monthly\n' in open(os.path.join(config_dir, 'jobs.cfg')).read()
    assert load_jobs(config_dir)['monthly'].options['chain-period'] == 'monthly'
    assert ansible.module('guestvault.backup.backup_job', args)['changed'] is False
    bad = ansible.module('guestvault.backup.backup_job', dict(args, chain_period='weekly'))
    assert bad['_status'] == 'failed' and 'chain_period' in bad['msg']
