"""Issue 12: datastores in an S3 bucket, on a real SeaweedFS cluster (seaweed.py) and real QEMU.

Every restore is compared (qemu-img compare) with what the guest's disk held at the backup's
point in time. The tests share one cluster, each with a bucket of its own (test_s3_faults.py
breaks clusters of its own).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from guestvault_engine.errors import StorageError
from guestvault_engine.datastore.chunk_store import ZERO_CHUNK_DIGEST
from guestvault_engine.datastore.dynamic_index import DynamicIndexWriter
from guestvault_engine.datastore.file_formats import (ENCRYPTED_BLOB_MAGIC,
                                                      ENCRYPTED_COMPRESSED_BLOB_MAGIC)
from guestvault_engine.datastore.fixed_index import read_fixed_index
from guestvault_engine.datastore.manifest import BackupManifest
from guestvault_engine.run.encryption_key import create_key
from guestvault_engine.run.locate import require_storage
from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
from guestvault_engine.run.garbage_collect import GarbageCollectRequest, run_garbage_collect
from guestvault_engine.run.backup_info import BackupInfoRequest, run_backup_info
from guestvault_engine.run.protect import ProtectRequest, run_protect
from guestvault_engine.run.prune import PruneRequest, run_prune
from guestvault_engine.run.restore import RestoreRequest, run_restore
from guestvault_engine.run.verify import VerifyRequest, run_verify
from lab_checks import same_content
from seaweed import SeaweedCluster

MiB = 1 << 20
TESTS = os.path.join(os.path.dirname(__file__), '..')


@pytest.fixture(autouse=True)
def fleecing_dir(tmp_path, monkeypatch):
    path = tmp_path / 'fleecing'
    monkeypatch.setenv('GUESTVAULT_FLEECING_DIR', str(path))
    # A dead endpoint is given up on after 3 attempts (about 3 s of backoff), not 6.
    monkeypatch.setenv('GUESTVAULT_S3_ATTEMPTS', '3')
    return path


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
    with SeaweedCluster(str(tmp_path_factory.mktemp('seaweed'))) as running:
        yield running


def configure(config_dir, cluster, cache, bucket, **options):
    cluster.configure(config_dir, cache, bucket, **options)


@pytest.fixture
def bucket(cluster):
    name = f"gv-{uuid.uuid4().hex[:12]}"
    cluster.create_bucket(name)
    return name


def backup(guest, config_dir, storage='s3', **options):
    return run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                               storage=storage, config_dir=config_dir, **options))


def restore(vmid, config_dir, target, storage='s3', **options):
    return run_restore(RestoreRequest(vmid=vmid, storage=storage, config_dir=config_dir,
                                      target_dir=str(target), **options))


def chunk_keys(cluster, bucket):
    return [k for k in cluster.object_keys(bucket, '.chunks/') if not k.endswith('.bad')]


def snapshot_keys(cluster, bucket, vmid):
    return sorted(k.split('/')[2] for k in cluster.object_keys(bucket, f'vm/{vmid}/')
                  if k.endswith('/index.json.blob'))


def test_a_guest_backed_up_through_s3_restores_bit_exact(make_guest, cluster, bucket,
                                                         config_dir, tmp_path):
    cache = tmp_path / 'cache'
    configure(config_dir, cluster, cache, bucket)
    guest = make_guest(disks=[('qcow2', 24 * MiB)])
    guest.write('vd0', 0x41, 0, 10 * MiB)
    points = []
    for step, pattern in enumerate((None, 0x42, 0x43)):
        if pattern is not None:
            guest.write('vd0', pattern, 16 * MiB, MiB)     # the same chunk, twice
        result = backup(guest, config_dir)
        points.append((result, guest.snapshot_disk(0, str(tmp_path / f'ref{step}.qcow2'))))
    full, inc1, inc2 = (result for result, _ref in points)
    assert [p[0]['level'] for p in points] == ['full', 'inc', 'inc']
    assert inc1['disks'][0]['read_chunks'] == inc2['disks'][0]['read_chunks'] == 1
    # In the bucket: the snapshots, PBS's layout, and one object per new chunk.
    times = [p[0]['time'] for p in points]
    assert snapshot_keys(cluster, bucket, guest.vmid) == times
    keys = set(cluster.object_keys(bucket))
    for name in ('index.json.blob', 'drive-vd0.img.fidx', 'guest.json.blob', 'client.log.blob'):
        assert f"vm/{guest.vmid}/{inc1['time']}/{name}" in keys
    assert f"vm/{guest.vmid}/owner" in keys
    assert len(chunk_keys(cluster, bucket)) == sum(p[0]['disks'][0]['new_chunks']
                                                   for p in points)
    for result, ref in points:
        out = restore(guest.vmid, config_dir, tmp_path / f"r-{result['time']}",
                      backup=result['time'])
        ok, text = same_content(ref, out['disks'][0]['target'])
        assert ok, text
    assert run_verify(VerifyRequest(guest.vmid, storage='s3', config_dir=config_dir))['verify_state'] == 'ok'
    # Protection and notes live in the bucket too: prune keeps the protected full.
    run_protect(ProtectRequest(guest.vmid, backup=full['time'], protected=True, notes='keep me',
                               storage='s3', config_dir=config_dir))
    assert f"vm/{guest.vmid}/{full['time']}/.protected" in cluster.object_keys(bucket)
    run_prune(PruneRequest(vmid=guest.vmid, storage='s3', config_dir=config_dir,
                           prune_backups={'keep-last': 1}))
    assert snapshot_keys(cluster, bucket, guest.vmid) == [full['time'], inc2['time']]
    listed = run_backup_info(BackupInfoRequest(guest.vmid, storage='s3', config_dir=config_dir))
    assert [(b['time'], b['protected']) for b in listed['backups']] == \
        [(full['time'], True), (inc2['time'], False)]
    assert listed['backups'][0]['notes'] == 'keep me'
    # GC removes the chunk only the pruned incremental named, and no other.
    gc = run_garbage_collect(GarbageCollectRequest(storage='s3', grace='0s', config_dir=config_dir))
    assert gc['removed_chunks'] == inc1['disks'][0]['new_chunks'] == 1, gc
    assert len(chunk_keys(cluster, bucket)) == \
        full['disks'][0]['new_chunks'] + inc2['disks'][0]['new_chunks']
    for result, ref in (points[0], points[2]):
        out = restore(guest.vmid, config_dir, tmp_path / f"gc-{result['time']}",
                      backup=result['time'])
        ok, text = same_content(ref, out['disks'][0]['target'])
        assert ok, text


NODE_B = """
import json, sys
sys.path.insert(0, {tests!r})
import conftest  # noqa: F401  (puts the engine on the path)
from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
result = run_guest_backup(GuestBackupRequest(**json.loads(sys.argv[1])))
print(json.dumps({{k: result[k] for k in ('time', 'level', 'disks')}}))
"""


def test_two_nodes_share_one_bucket_and_store_shared_chunks_once(
        make_guest, cluster, bucket, tmp_path, monkeypatch):
    base = tmp_path / 'base.raw'
    with open(base, 'wb') as handle:
        handle.write(os.urandom(24 * MiB))
        handle.truncate(32 * MiB)
    nodes = {}
    for node in ('a', 'b'):
        config_dir = tmp_path / f'etc-{node}'
        (config_dir / 'guests.d').mkdir(parents=True)
        configure(str(config_dir), cluster, tmp_path / f'cache-{node}', bucket)
        nodes[node] = str(config_dir)
    guests = {}
    for index, node in enumerate(('a', 'b')):
        workdir = tmp_path / f'guest{index}'          # make_guest's workdir for this guest
        workdir.mkdir()
        subprocess.run(['qemu-img', 'convert', '-q', '-O', 'qcow2', str(base),
                        str(workdir / 'disk0.qcow2')], check=True)
        guests[node] = make_guest(disks=[('qcow2', 32 * MiB)], vmid=9101 + index)
    guests['a'].write('vd0', 0x5a, 28 * MiB, MiB)         # each writes one chunk of its own
    guests['b'].write('vd0', 0x5b, 28 * MiB, MiB)
    first = backup(guests['a'], nodes['a'])
    after_a = set(chunk_keys(cluster, bucket))
    request = dict(vmid=guests['b'].vmid, qmp_socket=guests['b'].qmp_socket, storage='s3',
                   config_dir=nodes['b'])
    proc = subprocess.run([sys.executable, '-c', NODE_B.format(tests=TESTS), json.dumps(request)],
                          capture_output=True, text=True, timeout=300, check=False,
                          env=dict(os.environ, GUESTVAULT_RUN_DIR=str(tmp_path / 'run-b')))
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = json.loads(proc.stdout.strip().splitlines()[-1])
    after_b = set(chunk_keys(cluster, bucket))
    # 6 data chunks from the base, one of each guest's own, the zero chunk: B added only its own.
    assert len(after_b - after_a) == 1, (len(after_a), len(after_b))
    assert second['disks'][0]['new_chunks'] == 1
    # every chunk but the zero one went through B's backup (and was found in the bucket)
    assert second['disks'][0]['reused_chunks'] + second['disks'][0]['read_chunks'] == 7
    # Node A sees, verifies and restores node B's guest, with a cache that never held it.
    assert run_backup_info(BackupInfoRequest(guests['b'].vmid, storage='s3', config_dir=nodes['a']))['backups']
    ref = guests['b'].snapshot_disk(0, str(tmp_path / 'ref-b.qcow2'))
    out = restore(guests['b'].vmid, nodes['a'], tmp_path / 'r-b')
    ok, text = same_content(ref, out['disks'][0]['target'])
    assert ok, text
    assert run_verify(VerifyRequest(guests['b'].vmid, storage='s3',
                                    config_dir=nodes['a']))['verify_state'] == 'ok'
    # A GC on node A keeps every chunk node B's snapshot names.
    gc = run_garbage_collect(GarbageCollectRequest(storage='s3', grace='0s', config_dir=nodes['a']))
    assert gc['removed_chunks'] == 0 and gc['index_files'] == 2
    assert first['level'] == second['level'] == 'full'


def test_a_wrong_secret_is_a_clear_error_and_writes_nothing(make_guest, cluster, bucket,
                                                            config_dir, tmp_path):
    configure(config_dir, cluster, tmp_path / 'cache', bucket, secret='not-the-secret')
    guest = make_guest(disks=[('qcow2', 8 * MiB)])
    guest.write('vd0', 0x61, 0, MiB)
    with pytest.raises(StorageError, match='refused the credentials.*secret-key') as caught:
        backup(guest, config_dir)
    assert 'not-the-secret' not in str(caught.value)
    assert cluster.object_keys(bucket) == []
    assert not guest.execute('query-block-exports') and not guest.execute('query-block-jobs')


def test_an_unreachable_endpoint_and_a_missing_bucket_are_named(make_guest, cluster, config_dir,
                                                                tmp_path):
    guest = make_guest(disks=[('qcow2', 8 * MiB)])
    configure(config_dir, cluster, tmp_path / 'cache', 'no-such-bucket-here')
    with pytest.raises(StorageError, match='no-such-bucket-here on .* does not exist; create the bucket'):
        backup(guest, config_dir)
    with open(os.path.join(config_dir, 'storage.cfg')) as handle:
        text = handle.read()
    with open(os.path.join(config_dir, 'storage.cfg'), 'w') as handle:
        handle.write(text.replace(cluster.endpoint, 'http://127.0.0.1:9'))
    with pytest.raises(StorageError, match='cannot be reached after 3 attempts'):
        backup(guest, config_dir)


def test_a_deleted_cache_is_rebuilt_and_restore_still_works(make_guest, cluster, bucket,
                                                            config_dir, tmp_path):
    cache = tmp_path / 'cache'
    configure(config_dir, cluster, cache, bucket)
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    guest.write('vd0', 0x71, 0, 6 * MiB)
    first = backup(guest, config_dir)
    ref = guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2'))
    shutil.rmtree(cache)
    out = restore(guest.vmid, config_dir, tmp_path / 'r')
    ok, text = same_content(ref, out['disks'][0]['target'])
    assert ok, text
    snapshot = cache / 'vm' / str(guest.vmid) / first['time']
    assert sorted(os.listdir(snapshot)) == ['client.log.blob', 'drive-vd0.img.fidx',
                                            'guest.json.blob', 'index.json.blob']
    # The next backup is an incremental on the rebuilt cache; it uploads only what changed.
    guest.write('vd0', 0x72, 12 * MiB, MiB)
    second = backup(guest, config_dir)
    assert second['level'] == 'inc' and second['disks'][0]['read_chunks'] == 1
    ref2 = guest.snapshot_disk(0, str(tmp_path / 'ref2.qcow2'))
    out = restore(guest.vmid, config_dir, tmp_path / 'r2')
    ok, text = same_content(ref2, out['disks'][0]['target'])
    assert ok, text


def test_the_provider_sees_only_encrypted_chunks_and_blobs(make_guest, cluster, bucket,
                                                           config_dir, tmp_path):
    (tmp_path / 'keys').mkdir(mode=0o700)
    key = create_key(str(tmp_path / 'keys' / 's3.key'), kdf='none')
    configure(config_dir, cluster, tmp_path / 'cache', bucket, key=key['path'])
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    guest.write('vd0', 0xa1, 0, 8 * MiB)
    result = backup(guest, config_dir)
    ref = guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2'))
    client = cluster.client()
    blobs = [k for k in cluster.object_keys(bucket)
             if k.startswith('.chunks/') or k.endswith(('guest.json.blob', 'client.log.blob'))]
    assert len(blobs) == 4          # the 0xa1 chunk, the zero chunk, the guest config, the log
    for name in blobs:
        magic = client.get_object(Bucket=bucket, Key=name)['Body'].read()[:8]
        assert magic in (ENCRYPTED_BLOB_MAGIC, ENCRYPTED_COMPRESSED_BLOB_MAGIC), name
    manifest = client.get_object(Bucket=bucket, Key=f"vm/{guest.vmid}/{result['time']}/"
                                 "index.json.blob")['Body'].read()
    decoded = BackupManifest.decode(manifest)            # signed, as PBS keeps it
    assert decoded.unprotected['key-fingerprint'] == key['fingerprint']
    assert {f.crypt_mode for f in decoded.files} == {'encrypt'}
    out = restore(guest.vmid, config_dir, tmp_path / 'r')
    ok, text = same_content(ref, out['disks'][0]['target'])
    assert ok, text


def test_gc_does_not_sweep_while_a_backup_writes_and_a_backup_waits_for_gc(
        make_guest, cluster, bucket, config_dir, tmp_path):
    configure(config_dir, cluster, tmp_path / 'cache', bucket)
    guest = make_guest(disks=[('qcow2', 8 * MiB)])
    guest.write('vd0', 0xb1, 0, MiB)
    backup(guest, config_dir)
    other_node = require_storage(config_dir, 's3')
    with other_node.writer():                    # a backup writing from anywhere
        with pytest.raises(StorageError, match='does not sweep while backups write'):
            run_garbage_collect(GarbageCollectRequest(storage='s3', grace='0s', config_dir=config_dir))
        checked = run_garbage_collect(GarbageCollectRequest(storage='s3', grace='0s', config_dir=config_dir,
                                                            check_mode=True))
        assert checked['removed_chunks'] == 0 and checked['index_files'] == 1
    assert not cluster.object_keys(bucket, '.leases/')
    with other_node.collecting_garbage():        # a GC sweeping from anywhere
        with pytest.raises(StorageError, match='garbage collection .* is running'):
            backup(guest, config_dir, lockwait=0.05)
    # The GC wrote a new generation: the next backup drops what its cache knew and still
    # stores a complete snapshot.
    assert cluster.object_keys(bucket, '.gc-generation')
    result = backup(guest, config_dir)
    ref = guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2'))
    out = restore(guest.vmid, config_dir, tmp_path / 'r', backup=result['time'])
    ok, text = same_content(ref, out['disks'][0]['target'])
    assert ok, text


HOLD_LEASE = """
import sys, time
sys.path.insert(0, {tests!r})
import conftest  # noqa: F401  (puts the engine on the path)
from guestvault_engine.run.locate import require_storage
with require_storage(sys.argv[1], 's3').writer():
    print('held', flush=True)
    time.sleep(600)
"""


def test_a_lease_of_a_killed_run_on_this_node_is_stale_and_one_of_another_node_is_named(
        cluster, bucket, config_dir, tmp_path):
    configure(config_dir, cluster, tmp_path / 'cache', bucket)
    holder = subprocess.Popen([sys.executable, '-c', HOLD_LEASE.format(tests=TESTS), config_dir],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        with pytest.raises(StorageError, match=f'does not sweep while backups write.*pid '
                           f'{holder.pid}, writer lease until .*Z unless renewed'):
            run_garbage_collect(GarbageCollectRequest(storage='s3', grace='0s', config_dir=config_dir))
    finally:
        holder.kill()                                   # SIGKILL: no clean-up runs
        holder.wait(timeout=60)
    assert cluster.object_keys(bucket, '.leases/')
    assert run_garbage_collect(GarbageCollectRequest(storage='s3', grace='0s', config_dir=config_dir))['index_files'] == 0
    assert not cluster.object_keys(bucket, '.leases/')
    # A lease another node holds is live until it lapses: the refusal says whose, and until when.
    cluster.client().put_object(Bucket=bucket, Key='.leases/writer-elsewhere', Body=json.dumps(
        {'kind': 'writer', 'node': 'node-elsewhere', 'pid': holder.pid}).encode())
    with pytest.raises(StorageError, match=r'node node-elsewhere pid \d+, writer lease until '
                       r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ'):
        run_garbage_collect(GarbageCollectRequest(storage='s3', grace='0s', config_dir=config_dir))


def test_modules_work_on_an_s3_datastore_from_a_second_node(ansible, make_guest, cluster, bucket,
                                                            config_dir, tmp_path):
    configure(config_dir, cluster, tmp_path / 'cache', bucket)
    other = tmp_path / 'etc-other'                     # a second node: its own cache
    (other / 'guests.d').mkdir(parents=True)
    configure(str(other), cluster, tmp_path / 'cache-other', bucket)
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    guest.write('vd0', 0xc1, 0, 8 * MiB)
    taken = ansible.module('guestvault.backup.guest_backup',
                           {'storage': 's3', 'config_dir': config_dir, 'vmid': guest.vmid,
                            'qmp_socket': guest.qmp_socket, 'notes_template': 'to s3'})
    assert taken.get('changed') and taken['level'] == 'full', taken
    common = {'storage': 's3', 'config_dir': str(other)}
    info = ansible.module('guestvault.backup.backup_info', dict(common, vmid=guest.vmid))
    assert [b['notes'] for b in info['backups']] == ['to s3'], info
    assert ansible.module('guestvault.backup.protect',
                          dict(common, vmid=guest.vmid, backup='latest', protected=True))['changed']
    assert ansible.module('guestvault.backup.verify',
                          dict(common, vmid=guest.vmid))['verify_state'] == 'ok'
    pruned = ansible.module('guestvault.backup.prune',
                            dict(common, vmid=guest.vmid, prune_backups='keep-last=1'))
    assert pruned['removed'] == []
    gc = ansible.module('guestvault.backup.garbage_collect', dict(common, grace='0s'))
    assert gc['removed_chunks'] == 0 and gc['index_files'] == 1, gc
    ref = guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2'))
    restored = ansible.module('guestvault.backup.restore',
                              dict(common, vmid=guest.vmid, target_dir=str(tmp_path / 'r')))
    assert restored['changed'] and restored['verified'], restored
    ok, text = same_content(ref, restored['disks'][0]['target'])
    assert ok, text
    # The first node sees the protection the second one set.
    listed = run_backup_info(BackupInfoRequest(guest.vmid, storage='s3', config_dir=config_dir))['backups']
    assert [b['protected'] for b in listed] == [True]


def test_verify_moves_a_corrupt_chunk_aside_and_the_next_backup_heals_it(
        make_guest, cluster, bucket, config_dir, tmp_path):
    configure(config_dir, cluster, tmp_path / 'cache', bucket)
    guest = make_guest(disks=[('qcow2', 8 * MiB)])
    guest.write('vd0', 0xd1, 0, 4 * MiB)
    first = backup(guest, config_dir)
    data_chunks = chunk_keys(cluster, bucket)
    client = cluster.client()
    victim = next(k for k in data_chunks if not k.endswith(ZERO_CHUNK_DIGEST.hex()))
    client.put_object(Bucket=bucket, Key=victim, Body=b'\0' * 4096)     # damaged in the bucket
    result = run_verify(VerifyRequest(guest.vmid, storage='s3', config_dir=config_dir))
    assert result['verify_state'] == 'failed'
    assert any(victim.rsplit('/', 1)[1] in p and first['time'] in p for p in result['problems'])
    assert f"{victim}.0.bad" in cluster.object_keys(bucket) and victim not in chunk_keys(
        cluster, bucket)
    second = backup(guest, config_dir, level='full')
    assert second['disks'][0]['new_chunks'] == 1
    assert run_verify(VerifyRequest(guest.vmid, storage='s3', config_dir=config_dir))['verify_state'] == 'ok'
    ref = guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2'))
    out = restore(guest.vmid, config_dir, tmp_path / 'r')
    ok, text = same_content(ref, out['disks'][0]['target'])
    assert ok, text


def test_files_come_back_out_of_an_s3_datastore_with_an_empty_cache(cluster, bucket,
                                                                    config_dir, tmp_path):
    """file_restore from a bucket, the cache deleted first: the appliance reads the snapshot
    through the NBD server, whose chunks come from the bucket."""
    from disk_layouts import LayoutGuest, ext4_image, write_tree
    from guestvault_engine.run.file_restore import FileRestoreRequest, run_file_restore
    cache = tmp_path / 'cache'
    configure(config_dir, cluster, cache, bucket)
    files = {'etc/hostname': b's3host\n', 'srv/blob.bin': os.urandom(3 * MiB + 5)}
    sums = write_tree(str(tmp_path / 'tree'), files)
    ext4_image(str(tmp_path / 'disk.raw'), str(tmp_path / 'tree'), 32 * MiB)
    subprocess.run(['qemu-img', 'convert', '-q', '-O', 'qcow2', str(tmp_path / 'disk.raw'),
                    str(tmp_path / 'disk.qcow2')], check=True)
    guest = LayoutGuest(str(tmp_path / 'guest'), str(tmp_path / 'disk.qcow2'), 9421).start()
    try:
        backup(guest, config_dir)
    finally:
        guest.stop()
    shutil.rmtree(cache)
    result = run_file_restore(FileRestoreRequest(vmid=9421, config_dir=config_dir, storage='s3',
                                                 paths=['/srv', '/etc/hostname'],
                                                 dest=str(tmp_path / 'out')))
    assert result['files'] == 2
    for path, digest in sums.items():
        with open(tmp_path / 'out' / path, 'rb') as handle:
            assert hashlib.sha256(handle.read()).hexdigest() == digest, path


def test_gc_keeps_what_a_damaged_manifest_and_another_groups_dynamic_index_name(
        make_guest, cluster, bucket, config_dir, tmp_path):
    """Issue 20, finding 1 on S3: a snapshot whose manifest in the bucket has one flipped bit
    (and a cache that has to fetch it anew), and a container's .didx that PBS would have
    written: GC with grace 0 sweeps none of their chunks."""
    cache = tmp_path / 'cache'
    configure(config_dir, cluster, cache, bucket)
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    guest.write('vd0', 0xD1, 0, 8 * MiB)
    old = backup(guest, config_dir, level='full')
    guest.write('vd0', 0xD2, 0, 8 * MiB)
    newest = backup(guest, config_dir, level='full')
    ref = guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2'))
    # A container's archive names the old snapshot's chunks; then the old snapshot goes.
    index = read_fixed_index(str(cache / 'vm' / str(guest.vmid) / old['time']
                                 / 'drive-vd0.img.fidx'))
    writer = DynamicIndexWriter(str(tmp_path / 'root.pxar.didx'))
    for number, digest in enumerate(sorted(index.distinct_digests())):
        writer.add_chunk((number + 1) * 4096, digest)
    writer.close(durable=False)
    client = cluster.client()
    didx_key = 'ct/300/2026-01-01T00:00:00Z/root.pxar.didx'
    client.put_object(Bucket=bucket, Key=didx_key, Body=open(writer.path, 'rb').read())
    run_prune(PruneRequest(vmid=guest.vmid, storage='s3', config_dir=config_dir,
                           prune_backups='keep-last=1'))
    manifest_key = f"vm/{guest.vmid}/{newest['time']}/index.json.blob"
    original = client.get_object(Bucket=bucket, Key=manifest_key)['Body'].read()
    damaged = bytearray(original)
    damaged[40] ^= 0x10
    client.put_object(Bucket=bucket, Key=manifest_key, Body=bytes(damaged))
    shutil.rmtree(cache)                       # the damaged snapshot comes from the bucket
    chunks = chunk_keys(cluster, bucket)
    listed = run_backup_info(BackupInfoRequest(guest.vmid, storage='s3', config_dir=config_dir))
    assert listed['backups'] == [] and [d['id'] for d in listed['damaged']] == [newest['backup']]
    gc = run_garbage_collect(GarbageCollectRequest(storage='s3', grace='0s', config_dir=config_dir))
    assert gc['removed_chunks'] == 0 and gc['index_files'] == 2, gc
    assert chunk_keys(cluster, bucket) == chunks
    # The manifest repaired: the snapshot restores bit-exact.
    client.put_object(Bucket=bucket, Key=manifest_key, Body=original)
    out = restore(guest.vmid, config_dir, tmp_path / 'r')
    assert out['backup'] == newest['backup'] and out['warnings'] == []
    ok, text = same_content(ref, out['disks'][0]['target'])
    assert ok, text
    # Without the container's index, what only it named is garbage.
    client.delete_object(Bucket=bucket, Key=didx_key)
    gc = run_garbage_collect(GarbageCollectRequest(storage='s3', grace='0s',
                                                   config_dir=config_dir))
    assert gc['removed_chunks'] == 1 and gc['index_files'] == 1, gc      # the 0xD1 chunk
