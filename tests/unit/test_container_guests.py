"""Containers beside VMs in the verbs other than backup and restore: a selection (--all, --pool,
--exclude, a job) takes both kinds; what only a VM has (bitmaps, QMP sockets, live restore,
incremental levels and chains) is refused for a container before anything is done, saying what
to do instead. The verbs on real containers are in tests/integration/test_lxc_guests.py."""
import os

import pytest

from guestvault_engine.errors import ConfigError
from guestvault_engine.policy.chain import check_container_level
from guestvault_engine.restore.live import target_guest
from guestvault_engine.run.backup_job import apply_job
from guestvault_engine.run.guest_bitmaps import GuestBitmapsRequest, run_guest_bitmaps
from guestvault_engine.run.leftovers import anything
from guestvault_engine.run.locate import resolve_guest
from guestvault_engine.run.node_command import select_guests
from guestvault_engine.run.restore_plan import RestoreRequest

VMS = {101: 'web', 103: None}
CONTAINERS = {102: 'web', 104: None, 150: 'db'}


@pytest.fixture
def config_dir(tmp_path):
    """A registry of VMs and containers, interleaved by vmid, some in pool web."""
    guests = tmp_path / 'guests.d'
    guests.mkdir()
    for vmid, pool in VMS.items():
        (guests / f'{vmid}.conf').write_text(f"qmp: /run/qemu/{vmid}.qmp\n"
                                             + (f"pool: {pool}\n" if pool else ''))
    for vmid, pool in CONTAINERS.items():
        (guests / f'{vmid}.conf').write_text(f"type: lxc\nlxc: ct{vmid}\n"
                                             + (f"pool: {pool}\n" if pool else ''))
    return str(tmp_path)


def selection(config_dir, **given):
    base = {'vmid': [], 'all': False, 'pool': None, 'exclude': []}
    return select_guests(config_dir, dict(base, **given))


def test_a_selection_takes_vms_and_containers_alike(config_dir):
    assert selection(config_dir, all=True) == [101, 102, 103, 104, 150]
    assert selection(config_dir, all=True, exclude=[102, 103]) == [101, 104, 150]
    assert selection(config_dir, pool='web') == [101, 102]
    assert selection(config_dir, pool='db') == [150]
    assert selection(config_dir, vmid=[150, 101]) == [150, 101]


@pytest.mark.parametrize('level, chain', [('auto', None), ('full', None), ('copy', None)])
def test_a_container_takes_every_level_that_makes_a_full_backup(level, chain):
    check_container_level(102, level, chain)


@pytest.mark.parametrize('level, chain, words', [
    ('inc', None, 'so level inc cannot apply'),
    ('auto', 'weekly', 'so chain weekly cannot apply'),
])
def test_a_container_refuses_level_inc_and_a_chain(level, chain, words):
    with pytest.raises(ConfigError, match=rf"guest 102 is a container.*always full and in no "
                       rf"chain, {words} to it; give level auto or full and no chain"):
        check_container_level(102, level, chain)


def job(config_dir, tmp_path, check_mode=False, **options):
    return apply_job('nightly', dict({'schedule': '23:00'}, **options), config_dir=config_dir,
                     unit_dir=str(tmp_path / 'units'), command='/usr/bin/guestvault-dump',
                     check_mode=check_mode, manage_systemd=False)


def test_a_job_holds_vms_and_containers(config_dir, tmp_path):
    result = job(config_dir, tmp_path, all=True, level='auto')
    assert result['changed'] and result['warnings'] == []
    assert 'all 1' in open(os.path.join(config_dir, 'jobs.cfg')).read()


@pytest.mark.parametrize('options, words', [
    ({'all': True, 'level': 'inc'}, 'guest 102 is a container.* level inc .*exclude 102'),
    ({'pool': 'db', 'chain': 'weekly'}, 'guest 150 is a container.* chain weekly .*exclude 150'),
    ({'vmid': [101, 104], 'level': 'inc'}, 'guest 104 is a container'),
])
def test_a_job_asking_a_container_for_inc_or_a_chain_is_refused_before_anything_is_written(
        config_dir, tmp_path, options, words):
    with pytest.raises(ConfigError, match=f"job nightly: {words}"):
        job(config_dir, tmp_path, **options)
    assert not os.path.exists(os.path.join(config_dir, 'jobs.cfg'))
    assert not os.path.exists(tmp_path / 'units')
    # check mode: a warning (an earlier task may still change the registry), nothing written
    result = job(config_dir, tmp_path, check_mode=True, **options)
    assert any('is a container' in w for w in result['warnings'])
    assert not os.path.exists(os.path.join(config_dir, 'jobs.cfg'))


def test_a_job_of_vms_only_or_excluding_its_containers_may_ask_for_inc(config_dir, tmp_path):
    assert job(config_dir, tmp_path, vmid=[101, 103], level='inc')['warnings'] == []
    assert job(config_dir, tmp_path, pool='web', exclude=[102], level='inc')['warnings'] == []


def test_guest_bitmaps_of_a_container_says_what_to_do_before_taking_any_lock(
        config_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / 'run'
    monkeypatch.setenv('GUESTVAULT_RUN_DIR', str(run_dir))
    for cleanup in (False, True):
        with pytest.raises(ConfigError, match=r"guest 102 is a container \(type lxc\), and "
                           r"guest_bitmaps works on a VM's dirty bitmaps.*run 'guestvault-dump "
                           r"--cleanup 102' on its node"):
            run_guest_bitmaps(GuestBitmapsRequest(102, config_dir=config_dir, cleanup=cleanup))
    assert not run_dir.exists()


def test_a_vm_socket_given_for_a_container_is_refused(config_dir):
    for sockets in (('/run/x.qmp', None), (None, '/run/x.qga')):
        with pytest.raises(ConfigError, match=r"guest 104 is a container \(type lxc\), and "
                           r"qmp_socket and agent_socket name a VM's sockets; leave them out"):
            resolve_guest(104, *sockets, config_dir=config_dir)
    assert resolve_guest(104, config_dir=config_dir).lxc == 'ct104'
    assert resolve_guest(101, '/run/other.qmp', config_dir=config_dir).qmp_socket == \
        '/run/other.qmp'


def test_live_restore_into_a_container_says_to_restore_without_live(config_dir, tmp_path):
    request = RestoreRequest(vmid=102, target_dir=str(tmp_path / 't'), config_dir=config_dir,
                             live=True)
    with pytest.raises(ConfigError, match=r"guest 102 is a container \(type lxc\), and live "
                       r"restore starts a VM .*; restore it without live"):
        target_guest(request)


def test_anything_covers_a_containers_leftovers():
    nothing = {'interrupted_run': None, 'frozen': False, 'stopped': False, 'temp_dir': None,
               'snapshots': [], 'partial_backups': []}
    assert not anything(nothing)
    for key, value in (('frozen', True), ('temp_dir', '/var/tmp/x'),
                       ('partial_backups', ['/b/x.tar.dat']), ('interrupted_run', {'pid': 1})):
        assert anything(dict(nothing, **{key: value}))
