"""What a storage holds: backups listed, chosen by id, ``latest`` or time, and their chains.

Also the small pieces of per-backup state that change after a backup is taken (verify state,
protection, notes), and the recovery of an index update that a crash interrupted.
"""
from __future__ import annotations

import json
import os
import re

from ..errors import ConfigError, StorageError
from .directory import INDEX, PROTECTED, format_time, write_file_atomic
from ..times import to_datetime

VERIFY = 'verify.json'
NOTES = 'notes'
PENDING_INDEX = 'index.json.new'
_ID = re.compile(r'^(?:vm/(\d+)/)?(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)$')


def guest_ids(storage):
    root = os.path.join(storage.path, 'vm')
    if not os.path.isdir(root):
        return []
    return sorted(int(name) for name in os.listdir(root) if name.isdigit())


def all_backups(storage, vmid=None):
    """Complete backups, oldest first; of one guest or of every guest on the storage."""
    vmids = [vmid] if vmid is not None else guest_ids(storage)
    found = []
    for guest in vmids:
        found.extend(storage.backups(guest))
    return found


def resolve(storage, vmid, backup='latest', until=None):
    """The backup a user means: ``latest``, an id/time, or the newest at or before ``until``."""
    backups = storage.backups(vmid)
    if not backups:
        raise StorageError(f"guest {vmid} has no backups on {storage.label}")
    if until is not None:
        limit = to_datetime(until, 'until')
        earlier = [b for b in backups if b.time <= limit]
        if not earlier:
            raise StorageError(
                f"guest {vmid} has no backup at or before {format_time(limit)}; its first "
                f"backup is {backups[0].index['time']}")
        return earlier[-1]
    if backup in (None, '', 'latest'):
        return backups[-1]
    match = _ID.match(str(backup))
    if match and match.group(1) and int(match.group(1)) != int(vmid):
        raise ConfigError(f"backup {backup} belongs to guest {match.group(1)}, not to guest "
                          f"{vmid}; set vmid {match.group(1)} or name one of {vmid}'s backups")
    if not match:
        raise ConfigError(f"backup {backup!r} is not a backup id of guest {vmid}: use 'latest', "
                          f"a time like {backups[-1].index['time']} or vm/{vmid}/<time>")
    wanted = match.group(2)
    for record in backups:
        if record.index['time'] == wanted:
            return record
    raise StorageError(f"guest {vmid} has no backup {wanted} on {storage.label}; its backups: "
                       + ', '.join(b.index['time'] for b in backups[-5:])
                       + (' (newest five)' if len(backups) > 5 else ''))


def chain_of(storage, record):
    """The backups a restore of ``record`` reads, full first; StorageError if one is missing."""
    by_time = {b.index['time']: b for b in storage.backups(record.index['vmid'])}
    chain = [record]
    while chain[0].index.get('parent'):
        parent = by_time.get(chain[0].index['parent'])
        if parent is None:
            raise StorageError(f"backup {chain[0].id} builds on {chain[0].index['parent']}, "
                               "which is missing from the storage: it cannot be restored")
        chain.insert(0, parent)
    return chain


def read_verify_state(record):
    try:
        with open(os.path.join(record.path, VERIFY)) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def write_verify_state(record, state):
    write_file_atomic(os.path.join(record.path, VERIFY),
                      json.dumps(state, indent=2, sort_keys=True) + '\n')


def read_notes(record):
    try:
        with open(os.path.join(record.path, NOTES)) as handle:
            return handle.read()
    except OSError:
        return None


def set_notes(record, notes):
    path = os.path.join(record.path, NOTES)
    if notes:
        write_file_atomic(path, notes)
    elif os.path.exists(path):
        os.unlink(path)


def set_protected(record, protected):
    path = os.path.join(record.path, PROTECTED)
    if protected:
        write_file_atomic(path, '')
    elif os.path.exists(path):
        os.unlink(path)
    record.protected = protected


def backup_size(record):
    total = 0
    for name in os.listdir(record.path):
        try:
            total += os.path.getsize(os.path.join(record.path, name))
        except OSError:
            pass
    return total


def describe(record):
    """One backup as modules return it (shaped for json_query)."""
    index = record.index
    verify = read_verify_state(record)
    return {
        'id': record.id, 'vmid': index['vmid'], 'time': index['time'],
        'epoch': int(record.time.timestamp()), 'guest_name': index.get('guest_name'),
        'level': index['level'], 'chain': index.get('chain'), 'parent': index.get('parent'),
        'mode': index.get('mode'), 'size': backup_size(record), 'protected': record.protected,
        'notes': read_notes(record), 'path': record.path,
        'verify_state': verify['state'] if verify else 'none',
        'verified_at': verify.get('time') if verify else None,
        'disks': [{'id': d['id'], 'virtual_size': d['virtual_size'], 'level': d['level'],
                   'size': d['size'], 'bytes_written': d.get('bytes_written')}
                  for d in index['disks']],
    }


def write_index(record, index):
    """Replace a backup's manifest in two steps that a crash cannot leave half-done.

    The new manifest is first written beside the old one; ``recover_pending`` completes or drops
    it after a crash, depending on whether the image files already match it.
    """
    pending = os.path.join(record.path, PENDING_INDEX)
    write_file_atomic(pending, json.dumps(index, indent=2, sort_keys=True) + '\n')
    return pending


def commit_index(record, pending):
    os.replace(pending, os.path.join(record.path, INDEX))
    with open(os.path.join(record.path, INDEX)) as handle:
        record.index = json.load(handle)


def recover_pending(storage, vmid, hasher):
    """Finish or drop manifest updates that a crash interrupted (call with the guest's lock).

    ``hasher(path)`` returns a file's sha256. A pending manifest whose image hashes match the
    files on disk describes them and replaces the old manifest; otherwise it is dropped.
    """
    done = []
    for record in storage.backups(vmid):
        pending = os.path.join(record.path, PENDING_INDEX)
        if not os.path.exists(pending):
            continue
        try:
            with open(pending) as handle:
                index = json.load(handle)
            matches = all(hasher(os.path.join(record.path, d['file'])) == d['sha256']
                          for d in index['disks'])
        except (OSError, ValueError, KeyError):
            matches = False
        if matches:
            commit_index(record, pending)
        else:
            os.unlink(pending)
        done.append((record.id, matches))
    return done
