# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Every module's options, in Ansible's argument_spec shape (plain dicts, no Ansible import).

Choices come from the engine's vocabulary (``_engine/vocabulary.py``), which the node command's
flags and the configuration parsers read too, so a word means the same everywhere.
"""
from __future__ import annotations

from ansible_collections.guestvault.backup.plugins.module_utils._engine.vocabulary import (
    CHAIN_PERIODS, COMPRESS, LEVELS, MODES, RESTORE_FORMATS)

CONFIG_DIR = {'type': 'path', 'default': '/etc/guestvault'}


def guest_argument_spec():
    """How a module reaches one guest: by vmid through the registry, or by its QMP socket."""
    return {
        'vmid': {'type': 'int', 'required': True},
        'qmp_socket': {'type': 'path'},
        'agent_socket': {'type': 'path'},
        'config_dir': CONFIG_DIR,
    }


def storage_argument_spec():
    return {
        'storage': {'type': 'str'},
        'dumpdir': {'type': 'path'},
    }


def backup_argument_spec():
    spec = guest_argument_spec()
    spec.update(storage_argument_spec())
    spec.update({
        'level': {'type': 'str', 'default': 'auto', 'choices': list(LEVELS)},
        'chain': {'type': 'str'},
        'chain_period': {'type': 'str', 'default': 'none', 'choices': list(CHAIN_PERIODS)},
        'include': {'type': 'list', 'elements': 'str'},
        'exclude': {'type': 'list', 'elements': 'str'},
        'include_raw': {'type': 'bool', 'default': False},
        'mode': {'type': 'str', 'choices': list(MODES)},
        'stopwait': {'type': 'float'},
        'lockwait': {'type': 'float'},
        'freeze_timeout': {'type': 'float'},
        'bwlimit': {'type': 'int'},
        'performance': {'type': 'dict', 'options': {
            'max_workers': {'type': 'int'},
        }},
        'compress': {'type': 'str', 'choices': list(COMPRESS)},
        'notes_template': {'type': 'str'},
        'protected': {'type': 'bool'},
        'script': {'type': 'path'},
        'cluster': {'type': 'str', 'default': ''},
        'node': {'type': 'str'},
        'max_age': {'type': 'str'},
    })
    return spec


def stored_backup_argument_spec():
    """How a module names backups on a storage: the guest, and where its backups live."""
    spec = storage_argument_spec()
    spec.update({
        'vmid': {'type': 'int', 'required': True},
        'config_dir': CONFIG_DIR,
        'lockwait': {'type': 'float', 'default': 180},
    })
    return spec


def restore_argument_spec():
    spec = stored_backup_argument_spec()
    spec.update({
        'backup': {'type': 'str'},
        'until': {'type': 'str'},
        'target_dir': {'type': 'path', 'required': True},
        'disks': {'type': 'list', 'elements': 'str'},
        'format': {'type': 'str', 'default': 'qcow2', 'choices': list(RESTORE_FORMATS)},
        'snapshots': {'type': 'bool', 'default': False},
        'bwlimit': {'type': 'int', 'default': 0},
        'force': {'type': 'bool', 'default': False},
        'new_vmid': {'type': 'int'},
        'new_qmp_socket': {'type': 'path'},
        'live': {'type': 'bool', 'default': False},
    })
    return spec


def file_restore_argument_spec():
    spec = stored_backup_argument_spec()
    spec.update({
        'backup': {'type': 'str', 'default': 'latest'},
        'filesystem': {'type': 'str'},
        'paths': {'type': 'list', 'elements': 'str', 'default': ['/'], 'aliases': ['path']},
        'dest': {'type': 'path'},
        'archive': {'type': 'path'},
        'overwrite': {'type': 'bool', 'default': False},
        'max_size': {'type': 'str', 'default': '4G'},
        'timeout': {'type': 'float', 'default': 1800},
    })
    return spec


KEEP_PARAMETERS = ('keep_all', 'keep_last', 'keep_hourly', 'keep_daily', 'keep_weekly',
                   'keep_monthly', 'keep_yearly')


def prune_argument_spec():
    spec = storage_argument_spec()
    spec.update({
        'vmid': {'type': 'int'},
        'config_dir': CONFIG_DIR,
        'prune_backups': {'type': 'str'},
        'timezone': {'type': 'str'},
        'lockwait': {'type': 'float', 'default': 180},
        'simulate': {'type': 'list', 'elements': 'dict'},
    })
    for key in KEEP_PARAMETERS:
        spec[key] = {'type': 'bool' if key == 'keep_all' else 'int'}
    return spec


def prune_policy_from_params(params):
    """The policy the user gave (property string or keep_* options), or None for the default."""
    if params.get('prune_backups'):
        return params['prune_backups']
    given = {key: params[key] for key in KEEP_PARAMETERS if params.get(key) is not None}
    return given or None


# backup_job parameters and the jobs.cfg keys they are written as.
JOB_OPTION_KEYS = {
    'schedule': 'schedule', 'vmid': 'vmid', 'all': 'all', 'pool': 'pool', 'exclude': 'exclude',
    'node': 'node', 'storage': 'storage', 'dumpdir': 'dumpdir', 'mode': 'mode',
    'level': 'level', 'chain': 'chain', 'chain_period': 'chain-period', 'compress': 'compress',
    'prune_backups': 'prune-backups', 'notes_template': 'notes-template', 'bwlimit': 'bwlimit',
    'script': 'script', 'protected': 'protected', 'repeat_missed': 'repeat-missed',
    'enabled': 'enabled', 'comment': 'comment',
}


def job_argument_spec():
    spec = storage_argument_spec()
    spec.update({
        'id': {'type': 'str', 'required': True},
        'state': {'type': 'str', 'default': 'present', 'choices': ['present', 'absent']},
        'schedule': {'type': 'str'},
        'vmid': {'type': 'list', 'elements': 'int'},
        'all': {'type': 'bool'},
        'pool': {'type': 'str'},
        'exclude': {'type': 'list', 'elements': 'int'},
        'node': {'type': 'list', 'elements': 'str'},
        'mode': {'type': 'str', 'choices': list(MODES)},
        'level': {'type': 'str', 'choices': list(LEVELS)},
        'chain': {'type': 'str'},
        'chain_period': {'type': 'str', 'choices': list(CHAIN_PERIODS)},
        'compress': {'type': 'str', 'choices': list(COMPRESS)},
        'prune_backups': {'type': 'str'},
        'notes_template': {'type': 'str'},
        'bwlimit': {'type': 'int'},
        'script': {'type': 'path'},
        'protected': {'type': 'bool'},
        'repeat_missed': {'type': 'bool', 'default': False},
        'enabled': {'type': 'bool', 'default': True},
        'comment': {'type': 'str'},
        'config_dir': CONFIG_DIR,
        'unit_dir': {'type': 'path', 'default': '/etc/systemd/system'},
        'command': {'type': 'path', 'default': '/usr/local/sbin/guestvault-dump'},
    })
    return spec


BACKUP_MUTUALLY_EXCLUSIVE = [('storage', 'dumpdir'), ('include', 'exclude')]


def backup_request_fields(params):
    """Module parameters (or CLI options) as BackupRequest keyword arguments."""
    fields = {k: params.get(k) for k in (
        'vmid', 'qmp_socket', 'agent_socket', 'storage', 'dumpdir', 'config_dir', 'level',
        'chain', 'chain_period', 'include', 'exclude', 'include_raw', 'mode', 'stopwait',
        'lockwait', 'freeze_timeout', 'bwlimit', 'compress', 'notes_template', 'protected',
        'script', 'cluster', 'node', 'max_age')}
    fields['max_workers'] = (params.get('performance') or {}).get('max_workers')
    return fields


def backup_info_argument_spec():
    spec = storage_argument_spec()
    spec.update({'vmid': {'type': 'int'}, 'config_dir': CONFIG_DIR})
    return spec


def verify_argument_spec():
    spec = stored_backup_argument_spec()
    spec['backup'] = {'type': 'str', 'default': 'latest'}
    return spec


def protect_argument_spec():
    spec = stored_backup_argument_spec()
    spec.update({'backup': {'type': 'str', 'default': 'latest'},
                 'protected': {'type': 'bool'}, 'notes': {'type': 'str'}})
    return spec


LOCKWAIT = {'type': 'float', 'default': 180}


def guest_info_argument_spec():
    spec = guest_argument_spec()
    spec.update(storage_argument_spec())
    spec['chain_period'] = {'type': 'str', 'default': 'none', 'choices': list(CHAIN_PERIODS)}
    spec['lockwait'] = LOCKWAIT
    return spec


def guest_bitmaps_argument_spec():
    spec = guest_argument_spec()
    spec.update(storage_argument_spec())
    spec.update({'chain': {'type': 'str'},
                 'orphans': {'type': 'bool', 'default': False},
                 'cleanup': {'type': 'bool', 'default': False},
                 'state': {'type': 'str', 'default': 'absent', 'choices': ['absent']},
                 'lockwait': LOCKWAIT})
    return spec


def node_config_argument_spec():
    return {'config_dir': CONFIG_DIR, 'vzdump': {'type': 'dict'}, 'storages': {'type': 'dict'}}


def encryption_key_argument_spec():
    """A Proxmox Backup Server key file to create (or describe, when it exists)."""
    return {
        'path': {'type': 'path', 'required': True},
        'kdf': {'type': 'str', 'default': 'scrypt', 'choices': ['scrypt', 'none']},
        'passphrase': {'type': 'str', 'no_log': True},
        'passphrase_file': {'type': 'path'},
        'hint': {'type': 'str'},
        'force': {'type': 'bool', 'default': False},
    }


ENCRYPTION_KEY_MUTUALLY_EXCLUSIVE = [('passphrase', 'passphrase_file')]


def garbage_collect_argument_spec():
    return {
        'storage': {'type': 'str', 'required': True},
        'grace': {'type': 'str', 'default': '24h5m'},
        'config_dir': CONFIG_DIR,
    }


def schedule_info_argument_spec():
    return {
        'schedule': {'type': 'str', 'required': True},
        'start_time': {'type': 'str'},
        'iterations': {'type': 'int', 'default': 10},
        'timezone': {'type': 'str'},
    }


def registry_argument_spec():
    """The guest_registry module's options (keys of a guests.d/<vmid>.conf entry)."""
    return {
        'vmid': {'type': 'int', 'required': True},
        'state': {'type': 'str', 'default': 'present', 'choices': ['present', 'absent']},
        'name': {'type': 'str'},
        'qmp': {'type': 'path'},
        'agent': {'type': 'path'},
        'pool': {'type': 'str'},
        'tags': {'type': 'list', 'elements': 'str'},
        'include': {'type': 'list', 'elements': 'str'},
        'exclude': {'type': 'list', 'elements': 'str'},
        'start': {'type': 'str'},
        'description': {'type': 'str'},
        'config_dir': CONFIG_DIR,
    }
