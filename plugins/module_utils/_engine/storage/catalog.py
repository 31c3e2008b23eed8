"""What a storage holds, as users ask for it: backups listed, and one chosen by id, ``latest``
or time. Works on any :class:`~.base.Storage`.
"""
from __future__ import annotations

import re

from ..errors import BackupDamaged, ConfigError, StorageError
from ..times import format_time, to_datetime

_ID = re.compile(r'^(?:vm/(\d+)/)?(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)$')


def all_backups(storage, vmid=None):
    """Complete backups, oldest first; of one guest or of every guest on the storage."""
    return all_and_damaged(storage, vmid)[0]


def all_and_damaged(storage, vmid=None):
    """``(complete backups, damaged ones)`` (``DamagedBackup``: the manifest cannot be read),
    oldest first per guest; of one guest or of every guest on the storage."""
    vmids = [vmid] if vmid is not None else storage.guest_ids()
    found, damaged = [], []
    for guest in vmids:
        records, broken = storage.scan(guest)
        found.extend(records)
        damaged.extend(broken)
    return found, damaged


def damaged_warning(damaged, instead):
    """The warning for ``damaged`` backups newer than what a run acts on; ``instead`` says what
    it does instead (a sentence)."""
    names = '; '.join(f"{d.id} ({d.reason})" for d in damaged[-3:])
    more = f" and {len(damaged) - 3} older ones" if len(damaged) > 3 else ''
    return (f"the newest backup{'s are' if len(damaged) > 1 else ' is'} damaged: {names}{more}. "
            f"{instead}. Restore the damaged manifest from a copy, or remove that backup "
            "directory if it cannot be repaired")


def _damaged_error(damaged):
    return BackupDamaged(f"backup {damaged.id} is damaged: {damaged.reason}. Restore its "
                         "manifest from a copy, or name another backup", damaged)


def resolve(storage, vmid, backup='latest', until=None, warnings=None):
    """The backup a user means: ``latest``, an id/time, or the newest at or before ``until``.

    A damaged backup is never chosen: naming one raises ``CorruptData`` with the reason; when
    ``latest`` (or ``until``) would have meant a damaged one, the newest good backup before it is
    chosen and a warning naming the damaged one is appended to ``warnings`` (None: a caller
    that names a backup another run already resolved)."""
    every, damaged = storage.scan(vmid)
    backups = every
    if until is not None:
        limit = to_datetime(until, 'until')
        backups = [b for b in every if b.time <= limit]
        damaged = [d for d in damaged if d.time <= limit]
    if backup in (None, '', 'latest') or until is not None:
        if not backups:
            if damaged:
                raise _damaged_error(damaged[-1])
            if every:
                raise StorageError(
                    f"guest {vmid} has no backup at or before {format_time(limit)}; its first "
                    f"backup is {every[0].manifest.time}")
            raise StorageError(f"guest {vmid} has no backups on {storage.label}")
        newer = [d for d in damaged if d.time > backups[-1].time]
        if newer and warnings is not None:
            warnings.append(damaged_warning(newer, f"Using {backups[-1].id}, the newest good "
                                                   "backup"))
        return backups[-1]
    named = next((r for r in backups if r.archive is not None and r.id == str(backup)), None)
    if named is not None:
        return named        # a vzdump archive, named by its file name as PVE's volids are
    match = _ID.match(str(backup))
    if match and match.group(1) and int(match.group(1)) != int(vmid):
        raise ConfigError(f"backup {backup} belongs to guest {match.group(1)}, not to guest "
                          f"{vmid}; set vmid {match.group(1)} or name one of {vmid}'s backups")
    example = backups[-1].manifest.time if backups else '2025-01-31T12:00:00Z'
    if not match:
        raise ConfigError(f"backup {backup!r} is not a backup id of guest {vmid}: use 'latest', "
                          f"a time like {example}, vm/{vmid}/<time> or an archive's file name "
                          f"(vzdump-lxc-{vmid}-<time>.tar.zst)")
    wanted = match.group(2)
    for record in backups:
        if record.manifest.time == wanted:
            return record
    for broken in damaged:
        if broken.name == wanted:
            raise _damaged_error(broken)
    if not backups:
        raise StorageError(f"guest {vmid} has no backups on {storage.label}")
    raise StorageError(f"guest {vmid} has no backup {wanted} on {storage.label}; its backups: "
                       + ', '.join(b.manifest.time for b in backups[-5:])
                       + (' (newest five)' if len(backups) > 5 else ''))


def describe_damaged(damaged):
    """One damaged backup as backup_info returns it: where it is and why it cannot be read."""
    return {'id': damaged.id, 'vmid': damaged.vmid, 'time': damaged.name,
            'epoch': int(damaged.time.timestamp()), 'path': damaged.path,
            'reason': damaged.reason}
