"""Backups configured the Proxmox way: registry entries, storage.cfg, vzdump.conf defaults, and
the guest-agent error paths of snapshot mode (a fake agent: issue 5 proves the real freeze)."""
import json
import os
import socket
import threading

import pytest

from guestvault_engine.errors import GuestUnreachable
from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
from lab_checks import backups_in, same_content

MiB = 1 << 20


def write_config(config_dir, storage_path, vzdump='', guest=None):
    with open(os.path.join(config_dir, 'storage.cfg'), 'w') as handle:
        handle.write(f"dir: local\n\tpath /var/lib/vz\n\tcontent iso\n\n"
                     f"dir: backups\n\tpath {storage_path}\n\tcontent backup\n"
                     f"\tprune-backups keep-last=3\n")
    with open(os.path.join(config_dir, 'vzdump.conf'), 'w') as handle:
        handle.write(vzdump)
    if guest is not None:
        lines = [f"name: {guest['name']}", f"qmp: {guest['qmp']}"] + guest.get('extra', [])
        with open(os.path.join(config_dir, 'guests.d', f"{guest['vmid']}.conf"), 'w') as handle:
            handle.write('\n'.join(lines) + '\n')


def test_registry_storage_cfg_and_vzdump_defaults_drive_a_backup(make_guest, store, config_dir,
                                                                 tmp_path):
    guest = make_guest(disks=[('qcow2', 16 * MiB), ('qcow2', 8 * MiB)], vmid=101)
    guest.execute('cont')
    write_config(config_dir, store,
                 vzdump='# node defaults\nmode: suspend\nbwlimit: 0\n'
                        'notes-template: {{guestname}} nightly\n',
                 guest={'vmid': 101, 'name': 'web01', 'qmp': guest.qmp_socket,
                        'extra': ['exclude: vd1', 'tags: web']})
    result = run_guest_backup(GuestBackupRequest(vmid=101, storage='backups', config_dir=config_dir))
    assert result['storage'] == 'backups' and result['backup_dir'].startswith(store)
    assert result['mode'] == 'suspend' and result['pause_seconds'] is not None
    assert [d['id'] for d in result['disks']] == ['vd0']        # registry exclude
    assert result['notes'] == 'web01 nightly'
    guest_json = json.load(open(os.path.join(result['backup_dir'], 'guest.json')))
    assert guest_json['registry']['tags'] == ['web']
    # An option given to the run overrides vzdump.conf.
    second = run_guest_backup(GuestBackupRequest(vmid=101, storage='backups', config_dir=config_dir,
                                                 mode='snapshot'))
    assert second['mode'] == 'snapshot' and second['level'] == 'inc'


def test_removing_the_newest_backup_makes_auto_fall_back_with_the_reason(
        make_guest, store, config_dir, tmp_path):
    import shutil
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    request = dict(vmid=guest.vmid, qmp_socket=guest.qmp_socket, dumpdir=store,
                   config_dir=config_dir)
    run_guest_backup(GuestBackupRequest(**request))
    guest.write('vd0', 0x21, 0, MiB)
    newest = run_guest_backup(GuestBackupRequest(**request))
    shutil.rmtree(newest['backup_dir'])
    guest.write('vd0', 0x22, MiB, MiB)
    result = run_guest_backup(GuestBackupRequest(**request))
    assert result['level'] == 'full'
    assert 'removed' in result['level_reason'] or 'another storage' in result['level_reason']
    ok, out = same_content(guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2')),
                           os.path.join(result['backup_dir'], 'vd0.qcow2'))
    assert ok, out


class FakeAgent(threading.Thread):
    """Speaks just enough qemu-ga to exercise snapshot mode's error paths."""

    def __init__(self, path, on_freeze=None, hang_on_freeze=False):
        super().__init__(daemon=True)
        self.path = path
        self.on_freeze = on_freeze
        self.hang_on_freeze = hang_on_freeze
        self.calls = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(4)
        self.start()

    def run(self):
        while True:
            try:
                conn = self.server.accept()[0]
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        buffer = b''
        with conn:
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                buffer += data
                while b'\n' in buffer:
                    line, buffer = buffer.split(b'\n', 1)
                    request = json.loads(line)
                    command = request['execute']
                    self.calls.append(command)
                    if command == 'guest-sync-delimited':
                        reply = b'\xff' + json.dumps({'return': request['arguments']['id']}).encode()
                    elif command == 'guest-fsfreeze-freeze':
                        if self.hang_on_freeze:
                            continue
                        if self.on_freeze:
                            self.on_freeze()
                        reply = json.dumps({'return': 2}).encode()
                    else:
                        reply = json.dumps({'return': {}}).encode()
                    conn.sendall(reply + b'\n')

    def close(self):
        self.server.close()


@pytest.fixture
def agent_path(tmp_path):
    return str(tmp_path / 'qga.sock')


def test_snapshot_freezes_around_the_point_in_time_and_thaws(make_guest, store, config_dir,
                                                             agent_path):
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    guest.execute('cont')
    agent = FakeAgent(agent_path)
    try:
        result = run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                                     agent_socket=agent_path, dumpdir=store,
                                                     config_dir=config_dir))
    finally:
        agent.close()
    assert result['frozen_filesystems'] == 2
    ops = [c for c in agent.calls if c.startswith('guest-fsfreeze')]
    assert ops == ['guest-fsfreeze-freeze', 'guest-fsfreeze-thaw']
    assert not any('not frozen' in w for w in result['warnings'])


def test_thaw_happens_even_when_the_point_in_time_fails(make_guest, store, config_dir,
                                                        agent_path):
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    guest.execute('cont')
    agent = FakeAgent(agent_path, on_freeze=guest.kill)   # QEMU dies while frozen
    try:
        with pytest.raises(GuestUnreachable, match='QEMU went away'):
            run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                                agent_socket=agent_path, dumpdir=store,
                                                config_dir=config_dir))
    finally:
        agent.close()
    assert agent.calls.count('guest-fsfreeze-thaw') == 1     # the agent answers the first one
    assert backups_in(store, guest.vmid) == []


def test_an_agent_that_hangs_on_freeze_times_out_and_is_thawed(make_guest, store, config_dir,
                                                               agent_path):
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    guest.execute('cont')
    agent = FakeAgent(agent_path, hang_on_freeze=True)
    try:
        result = run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                                     agent_socket=agent_path, dumpdir=store,
                                                     config_dir=config_dir, freeze_timeout=1))
    finally:
        agent.close()
    assert any('fsfreeze failed' in w for w in result['warnings'])
    # A freeze that may have happened in the guest after all is undone.
    assert 'guest-fsfreeze-thaw' in agent.calls
    assert result['level'] == 'full'


def test_vzdump_options_without_effect_are_named_in_a_warning_and_lzo_gets_advice(
        make_guest, store, config_dir):
    guest = make_guest(disks=[('qcow2', 8 * MiB)], vmid=101)
    write_config(config_dir, store, vzdump='mailto: root\nionice: 7\nmode: snapshot\n',
                 guest={'vmid': 101, 'name': 'web01', 'qmp': guest.qmp_socket})
    result = run_guest_backup(GuestBackupRequest(vmid=101, storage='backups', config_dir=config_dir))
    inert = [w for w in result['warnings'] if 'no effect' in w]
    assert len(inert) == 1 and 'ionice' in inert[0] and 'mode' not in inert[0]
    assert 'mailto' not in inert[0]     # notifications act (issue 23)
    from guestvault_engine.errors import ConfigError
    before = backups_in(store, 101)
    with pytest.raises(ConfigError, match='lzo has no qcow2 equivalent.*use compress zstd'):
        run_guest_backup(GuestBackupRequest(vmid=101, storage='backups', config_dir=config_dir,
                                            compress='lzo'))
    assert backups_in(store, 101) == before
