"""Every path on the node that guestvault uses, and the ``GUESTVAULT_*`` variable that overrides it.

One place, so a path is written once and a test (or a second node on the same host) can move
each one with its variable. The variables are read at each call, not at import, so a test that
sets one sees it used.
"""
from __future__ import annotations

import os

# The node's configuration: vzdump.conf, storage.cfg, jobs.cfg, guests.d/, keys/. Modules take
# it as config_dir (this is their default); the node command also reads GUESTVAULT_CONFIG_DIR.
CONFIG_DIR = '/etc/guestvault'
# Node locks, NBD sockets and run markers of the guests' runs: gone at reboot, as the runs are.
RUN_DIR = '/run/lock/guestvault'
# A datastore backup's fleecing images (pull capture).
FLEECING_DIR = '/var/lib/guestvault/fleecing'
# The file-restore appliance, built once from Debian's packages.
APPLIANCE_CACHE = '/var/cache/guestvault/appliance'
# file_restore's overlays and listings: not the run directory, whose /run/lock is a 5 MiB tmpfs
# on Debian.
WORK_DIR = '/var/tmp'
# What each scheduled job's last run did (guestvault-dump --job).
STATE_DIR = '/var/lib/guestvault/jobs'
# Where backup_job writes a job's systemd timer and service, and the command they run.
UNIT_DIR = '/etc/systemd/system'
NODE_COMMAND = '/usr/local/sbin/guestvault-dump'
# The MTA's sendmail interface that sendmail notification targets pipe mails to.
SENDMAIL = '/usr/sbin/sendmail'


def _overridden(variable, default):
    return os.environ.get(variable) or default


def default_config_dir():
    """``GUESTVAULT_CONFIG_DIR``, else /etc/guestvault: the node command's default."""
    return _overridden('GUESTVAULT_CONFIG_DIR', CONFIG_DIR)


def run_dir():
    """``GUESTVAULT_RUN_DIR``, else /run/lock/guestvault; created (0700) when missing."""
    directory = _overridden('GUESTVAULT_RUN_DIR', RUN_DIR)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    return directory


def fleecing_dir():
    """``GUESTVAULT_FLEECING_DIR``, else /var/lib/guestvault/fleecing."""
    return _overridden('GUESTVAULT_FLEECING_DIR', FLEECING_DIR)


def appliance_cache():
    """``GUESTVAULT_APPLIANCE_CACHE``, else /var/cache/guestvault/appliance."""
    return _overridden('GUESTVAULT_APPLIANCE_CACHE', APPLIANCE_CACHE)


def work_dir():
    """``GUESTVAULT_WORK_DIR``, else /var/tmp; created (0700) when missing."""
    directory = _overridden('GUESTVAULT_WORK_DIR', WORK_DIR)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    return directory


def sendmail_binary():
    """``GUESTVAULT_SENDMAIL``, else /usr/sbin/sendmail."""
    return _overridden('GUESTVAULT_SENDMAIL', SENDMAIL)


def state_dir():
    """``GUESTVAULT_STATE_DIR``, else /var/lib/guestvault/jobs."""
    return _overridden('GUESTVAULT_STATE_DIR', STATE_DIR)
