"""The words users give guestvault, each defined once (docs/architecture.md, "Vocabulary").

Modules' ``choices``, the node command's flags, the parsers of vzdump.conf and jobs.cfg and the
engine's own checks all read these, so a word accepted in one place is accepted in every place.
"""
from __future__ import annotations

# Guest kinds, as Proxmox names them (a registry entry's ``type``): a QEMU VM, an LXC container.
GUEST_TYPES = ('qemu', 'lxc')

# Consistency modes, as vzdump names them.
MODES = ('snapshot', 'suspend', 'stop')

# Backup levels: full, incremental, full-or-incremental, and a full outside any chain.
LEVELS = ('full', 'inc', 'auto', 'copy')

# How a chain ends by itself: never, or when a new calendar month begins.
CHAIN_PERIODS = ('none', 'monthly')

# vzdump's compress values and the qcow2 compression type each becomes (None: uncompressed).
# lzo is vzdump syntax, accepted where vzdump.conf and jobs.cfg are read, and refused when a
# backup would use it: qcow2 clusters are compressed with zlib or zstd only.
COMPRESS = ('0', '1', 'gzip', 'lzo', 'zstd')
QCOW2_COMPRESSION = {'0': None, '1': 'zstd', 'zstd': 'zstd', 'gzip': 'zlib'}
LZO_ADVICE = ("compress lzo has no qcow2 equivalent (qcow2 compresses clusters with zlib or "
              "zstd only); use compress zstd, which is as fast as lzo and smaller, or gzip")

# Image formats a restore writes.
RESTORE_FORMATS = ('qcow2', 'raw')

# A backup's name is the UTC time of its point in time, to the second (as PBS names snapshots).
BACKUP_TIME_FORMAT = '%Y-%m-%dT%H:%M:%SZ'
BACKUP_TIME_EXAMPLE = '2026-11-21T01:00:00Z'


def normalize_compress(value):
    """vzdump's compress value from what a user gave (``True``/``'yes'`` mean ``1``)."""
    text = str(value).strip().lower()
    if text in ('true', 'yes', 'on'):
        return '1'
    if text in ('false', 'no', 'off'):
        return '0'
    return text


# The prune module's keep_* options: Proxmox's keep-* retention keys, with underscores.
KEEP_OPTIONS = ('keep_all', 'keep_last', 'keep_hourly', 'keep_daily', 'keep_weekly',
                'keep_monthly', 'keep_yearly')


# Notifications: vzdump's notification-mode and mailnotification, and PBS's datastore 'notify'
# values, which the garbage_collect, verify and prune modules take for their events.
NOTIFICATION_MODES = ('auto', 'legacy-sendmail', 'notification-system')
MAIL_POLICIES = ('always', 'failure')
NOTIFY_POLICIES = ('always', 'error', 'never')
