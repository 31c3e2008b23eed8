"""Issue 12: faults under a datastore on S3, each on a SeaweedFS cluster of its own (seaweed.py).

A volume server killed, the S3 gateway stopped: the backup running then fails with a clear error
or completes, no half snapshot is ever visible, the guest is left as it was, and the next backup
is correct (compared with qemu-img compare against the guest's disk).
"""
import os
import threading

import pytest

from guestvault_engine.errors import GuestvaultError
from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
from guestvault_engine.run.garbage_collect import GarbageCollectRequest, run_garbage_collect
from lab_checks import same_content
from seaweed import SeaweedCluster
# fleecing_dir is an autouse fixture: imported, it applies here too
from test_s3_datastore import (  # pylint: disable=unused-import
    MiB, backup, configure, fleecing_dir, restore, snapshot_keys)


@pytest.fixture
def own_cluster(tmp_path):
    """A cluster for one test that breaks it."""
    with SeaweedCluster(str(tmp_path / 'seaweed')) as running:
        yield running


def run_in_thread(guest, config_dir, on_point_in_time, **options):
    """A backup on a thread; ``on_point_in_time`` runs once the chunks start to be read."""
    outcome = {}

    def log(line):
        if line.startswith('point in time'):
            on_point_in_time()

    def run():
        try:
            outcome['result'] = run_guest_backup(GuestBackupRequest(
                vmid=guest.vmid, qmp_socket=guest.qmp_socket, storage='s3',
                config_dir=config_dir, **options), log=log)
        except GuestvaultError as exc:
            outcome['error'] = exc
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=600)
    assert not thread.is_alive()
    return outcome


def test_a_volume_server_killed_mid_backup_leaves_no_half_snapshot(
        make_guest, own_cluster, config_dir, tmp_path, monkeypatch):
    # With a replica down SeaweedFS holds each put about 30 s before it answers InternalError:
    # one attempt is enough to see the backup fail cleanly.
    monkeypatch.setenv('GUESTVAULT_S3_ATTEMPTS', '1')
    bucket = 'faults'
    own_cluster.create_bucket(bucket)
    configure(config_dir, own_cluster, tmp_path / 'cache', bucket)
    guest = make_guest(disks=[('qcow2', 24 * MiB)])
    guest.write('vd0', 0x81, 0, 20 * MiB)
    first = backup(guest, config_dir)
    ref = guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2'))
    guest.write('vd0', 0x82, 0, 20 * MiB)
    outcome = run_in_thread(guest, config_dir, lambda: own_cluster.kill_volume_server(1),
                            bwlimit=4096, level='full')
    if 'error' in outcome:                     # SeaweedFS refuses writes with a replica down
        assert 'S3 service is failing' in str(outcome['error']) or \
            'cannot upload' in str(outcome['error']), outcome['error']
        assert snapshot_keys(own_cluster, bucket, guest.vmid) == [first['time']]
    else:
        assert snapshot_keys(own_cluster, bucket, guest.vmid)[-1] == outcome['result']['time']
    # Reads still work on the surviving replica: the first backup restores bit-exact.
    out = restore(guest.vmid, config_dir, tmp_path / 'r', backup=first['time'])
    ok, text = same_content(ref, out['disks'][0]['target'])
    assert ok, text
    assert not guest.execute('query-block-exports') and not guest.execute('query-block-jobs')


def test_the_gateway_stopped_mid_upload_fails_clearly_and_the_next_backup_is_correct(
        make_guest, own_cluster, config_dir, tmp_path, fleecing_dir):
    bucket = 'gateway'
    own_cluster.create_bucket(bucket)
    configure(config_dir, own_cluster, tmp_path / 'cache', bucket)
    guest = make_guest(disks=[('qcow2', 24 * MiB)])
    guest.write('vd0', 0x91, 0, 20 * MiB)
    first = backup(guest, config_dir)
    guest.write('vd0', 0x92, 0, 20 * MiB)
    outcome = run_in_thread(guest, config_dir, own_cluster.stop_s3, bwlimit=4096)
    assert 'error' in outcome
    assert 'cannot be reached after 3 attempts' in str(outcome['error']), outcome['error']
    own_cluster.start_s3()
    assert snapshot_keys(own_cluster, bucket, guest.vmid) == [first['time']]
    # Issue 20: the failed run could not delete its lease while S3 was down, yet a GC runs at
    # once (the lease names a run on this node that has ended) and removes the stale lease.
    assert own_cluster.object_keys(bucket, '.leases/')
    run_garbage_collect(GarbageCollectRequest(storage='s3', grace='1h', config_dir=config_dir))
    assert not own_cluster.object_keys(bucket, '.leases/')
    assert not guest.execute('query-block-exports') and not guest.execute('query-block-jobs')
    # The failed incremental lost nothing: the next one covers every write since the first.
    second = backup(guest, config_dir)
    assert second['level'] == 'inc', second['level_reason']
    ref = guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2'))
    out = restore(guest.vmid, config_dir, tmp_path / 'r')
    ok, text = same_content(ref, out['disks'][0]['target'])
    assert ok, text
    assert not any(os.scandir(fleecing_dir))
