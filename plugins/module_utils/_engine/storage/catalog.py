"""What a storage holds, as users ask for it: backups listed, and one chosen by id, ``latest``
or time. Works on any :class:`~.base.Storage`.
"""
from __future__ import annotations

import re

from ..errors import ConfigError, StorageError
from ..times import format_time, to_datetime

_ID = re.compile(r'^(?:vm/(\d+)/)?(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)$')


def all_backups(storage, vmid=None):
    """Complete backups, oldest first; of one guest or of every guest on the storage."""
    vmids = [vmid] if vmid is not None else storage.guest_ids()
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


def describe(storage, record):
    """One backup as modules return it (shaped for json_query)."""
    index = record.index
    verify = storage.read_verify_state(record)
    return {
        'id': record.id, 'vmid': index['vmid'], 'time': index['time'],
        'epoch': int(record.time.timestamp()), 'guest_name': index.get('guest_name'),
        'level': index['level'], 'chain': index.get('chain'), 'parent': index.get('parent'),
        'mode': index.get('mode'), 'size': storage.backup_size(record), 'protected': record.protected,
        'notes': storage.read_notes(record), 'path': record.path,
        'verify_state': verify['state'] if verify else 'none',
        'verified_at': verify.get('time') if verify else None,
        'disks': [{'id': d['id'], 'virtual_size': d['virtual_size'], 'level': d['level'],
                   'size': d['size'], 'bytes_written': d.get('bytes_written')}
                  for d in index['disks']],
    }
