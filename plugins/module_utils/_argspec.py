# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Every module's options with their constraints, as AnsibleModule's keyword arguments.

``<module>_argument_spec()`` returns ``{'argument_spec': ..., 'mutually_exclusive': ...,
'required_if': ..., 'required_one_of': ...}`` (plain data, no Ansible import), so a module
passes it whole to ``_ansible.run_module``. Choices come from the engine's vocabulary
(``_engine/vocabulary.py``), which the node command's flags and the configuration parsers read
too, so a word means the same everywhere; the default config_dir from ``_engine/paths.py``.
"""
from __future__ import annotations

from ansible_collections.guestvault.backup.plugins.module_utils._engine import paths
from ansible_collections.guestvault.backup.plugins.module_utils._engine.vocabulary import (
    CHAIN_PERIODS, COMPRESS, GUEST_TYPES, KEEP_OPTIONS, LEVELS, MAIL_POLICIES, MODES,
    NOTIFICATION_MODES, NOTIFY_POLICIES, RESTORE_FORMATS)

CONFIG_DIR = {'type': 'path', 'default': paths.CONFIG_DIR}
LOCKWAIT = {'type': 'float', 'default': 180}
# gc, verify and prune: their type=gc|verify|prune notification, as PBS's datastore 'notify'
NOTIFY = {'type': 'str', 'default': 'error', 'choices': list(NOTIFY_POLICIES)}
# A storage is named by its id or by a directory, never both.
STORAGE_OR_DUMPDIR = ('storage', 'dumpdir')


def module_spec(argument_spec, **constraints):
    """AnsibleModule's keyword arguments: the options and the constraints given."""
    return dict(argument_spec=argument_spec,
                **{key: list(value) for key, value in constraints.items() if value})


def _guest_options():
    """How a module reaches one guest: by vmid through the registry, or by its QMP socket."""
    return {
        'vmid': {'type': 'int', 'required': True},
        'qmp_socket': {'type': 'path'},
        'agent_socket': {'type': 'path'},
        'config_dir': CONFIG_DIR,
    }


def _storage_options():
    return {
        'storage': {'type': 'str'},
        'dumpdir': {'type': 'path'},
    }


def _stored_backup_options():
    """How a module names backups on a storage: the guest, and where its backups live."""
    options = _storage_options()
    options.update({
        'vmid': {'type': 'int', 'required': True},
        'config_dir': CONFIG_DIR,
        'lockwait': LOCKWAIT,
    })
    return options


def guest_backup_argument_spec():
    options = _guest_options()
    options.update(_storage_options())
    options.update({
        'level': {'type': 'str', 'default': 'auto', 'choices': list(LEVELS)},
        'chain': {'type': 'str'},
        'chain_period': {'type': 'str', 'default': 'none', 'choices': list(CHAIN_PERIODS)},
        'include': {'type': 'list', 'elements': 'str'},
        'exclude': {'type': 'list', 'elements': 'str'},
        'include_raw': {'type': 'bool', 'default': False},
        'mode': {'type': 'str', 'choices': list(MODES)},
        'stopwait': {'type': 'float'},
        'lockwait': {'type': 'float'},      # None: vzdump.conf's, else 180
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
        'exclude_path': {'type': 'list', 'elements': 'str'},
        'stdexcludes': {'type': 'bool'},
        'tmpdir': {'type': 'path'},
        'zstd': {'type': 'int'},
        'pigz': {'type': 'int'},
        # None: vzdump.conf's, as the node command's --notification-mode, --mailto, ...
        'notification_mode': {'type': 'str', 'choices': list(NOTIFICATION_MODES)},
        'mailto': {'type': 'list', 'elements': 'str'},
        'mailnotification': {'type': 'str', 'choices': list(MAIL_POLICIES)},
    })
    return module_spec(options, mutually_exclusive=[STORAGE_OR_DUMPDIR, ('include', 'exclude')])


def restore_argument_spec():
    options = _stored_backup_options()
    options.update({
        'backup': {'type': 'str'},
        'until': {'type': 'str'},
        'target_dir': {'type': 'path'},
        'disks': {'type': 'list', 'elements': 'str'},
        'format': {'type': 'str', 'default': 'qcow2', 'choices': list(RESTORE_FORMATS)},
        'snapshots': {'type': 'bool', 'default': False},
        'bwlimit': {'type': 'int', 'default': 0},
        'force': {'type': 'bool', 'default': False},
        'new_vmid': {'type': 'int'},
        'new_qmp_socket': {'type': 'path'},
        'live': {'type': 'bool', 'default': False},
        'lxc_name': {'type': 'str'},
        'lxcpath': {'type': 'path'},
        'start': {'type': 'bool', 'default': False},
    })
    return module_spec(options, mutually_exclusive=[STORAGE_OR_DUMPDIR, ('backup', 'until')])


def file_restore_argument_spec():
    options = _stored_backup_options()
    options.update({
        'backup': {'type': 'str', 'default': 'latest'},
        'filesystem': {'type': 'str'},
        'paths': {'type': 'list', 'elements': 'str', 'default': ['/'], 'aliases': ['path']},
        'dest': {'type': 'path'},
        'archive': {'type': 'path'},
        'overwrite': {'type': 'bool', 'default': False},
        'max_size': {'type': 'str', 'default': '4G'},
        'timeout': {'type': 'float', 'default': 1800},
    })
    return module_spec(options, mutually_exclusive=[STORAGE_OR_DUMPDIR, ('dest', 'archive')])


def prune_argument_spec():
    options = _storage_options()
    options.update({
        'vmid': {'type': 'int'},
        'config_dir': CONFIG_DIR,
        'prune_backups': {'type': 'str'},
        'timezone': {'type': 'str'},
        'lockwait': LOCKWAIT,
        'simulate': {'type': 'list', 'elements': 'dict'},
        'notify': NOTIFY,
    })
    for key in KEEP_OPTIONS:
        options[key] = {'type': 'bool' if key == 'keep_all' else 'int'}
    return module_spec(options, mutually_exclusive=[
        STORAGE_OR_DUMPDIR, ('storage', 'simulate'), ('dumpdir', 'simulate'),
        *[('prune_backups', key) for key in KEEP_OPTIONS]])


def backup_job_argument_spec():
    options = _storage_options()
    options.update({
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
        'unit_dir': {'type': 'path', 'default': paths.UNIT_DIR},
        'command': {'type': 'path', 'default': paths.NODE_COMMAND},
    })
    return module_spec(options,
                       mutually_exclusive=[STORAGE_OR_DUMPDIR, ('vmid', 'all'), ('vmid', 'pool')],
                       required_if=[('state', 'present', ('schedule',))])


def backup_info_argument_spec():
    options = _storage_options()
    options.update({'vmid': {'type': 'int'}, 'config_dir': CONFIG_DIR})
    return module_spec(options, mutually_exclusive=[STORAGE_OR_DUMPDIR],
                       required_one_of=[STORAGE_OR_DUMPDIR])


def verify_argument_spec():
    options = _stored_backup_options()
    options['backup'] = {'type': 'str', 'default': 'latest'}
    options['notify'] = NOTIFY
    return module_spec(options, mutually_exclusive=[STORAGE_OR_DUMPDIR])


def protect_argument_spec():
    options = _stored_backup_options()
    options.update({'backup': {'type': 'str', 'default': 'latest'},
                    'protected': {'type': 'bool'}, 'notes': {'type': 'str'}})
    return module_spec(options, mutually_exclusive=[STORAGE_OR_DUMPDIR],
                       required_one_of=[('protected', 'notes')])


def guest_info_argument_spec():
    options = _guest_options()
    options.update(_storage_options())
    options['chain_period'] = {'type': 'str', 'default': 'none', 'choices': list(CHAIN_PERIODS)}
    options['lockwait'] = LOCKWAIT
    return module_spec(options, mutually_exclusive=[STORAGE_OR_DUMPDIR])


def guest_bitmaps_argument_spec():
    options = _guest_options()
    options.update(_storage_options())
    options.update({'chain': {'type': 'str'},
                    'orphans': {'type': 'bool', 'default': False},
                    'cleanup': {'type': 'bool', 'default': False},
                    'state': {'type': 'str', 'default': 'absent', 'choices': ['absent']},
                    'lockwait': LOCKWAIT})
    return module_spec(options, mutually_exclusive=[STORAGE_OR_DUMPDIR, ('chain', 'cleanup'),
                                                    ('chain', 'orphans')])


def node_config_argument_spec():
    return module_spec({'config_dir': CONFIG_DIR, 'vzdump': {'type': 'dict'},
                        'storages': {'type': 'dict'}, 'notifications': {'type': 'dict'},
                        # whole dict masked: every value in it is a password, token or secret
                        'notification_secrets': {'type': 'dict', 'no_log': True}})


def notification_test_argument_spec():
    return module_spec({'target': {'type': 'str', 'required': True}, 'config_dir': CONFIG_DIR})


def encryption_key_argument_spec():
    """A Proxmox Backup Server key file to create (or describe, when it exists)."""
    return module_spec({
        'path': {'type': 'path', 'required': True},
        'kdf': {'type': 'str', 'default': 'scrypt', 'choices': ['scrypt', 'none']},
        'passphrase': {'type': 'str', 'no_log': True},
        'passphrase_file': {'type': 'path'},
        'hint': {'type': 'str'},
        'force': {'type': 'bool', 'default': False},
    }, mutually_exclusive=[('passphrase', 'passphrase_file')])


def garbage_collect_argument_spec():
    return module_spec({
        'storage': {'type': 'str', 'required': True},
        'grace': {'type': 'str', 'default': '24h5m'},
        'config_dir': CONFIG_DIR,
        'notify': NOTIFY,
    })


def schedule_info_argument_spec():
    return module_spec({
        'schedule': {'type': 'str', 'required': True},
        'start_time': {'type': 'str'},
        'iterations': {'type': 'int', 'default': 10},
        'timezone': {'type': 'str'},
    })


def guest_registry_argument_spec():
    """The guest_registry module's options (keys of a guests.d/<vmid>.conf entry)."""
    return module_spec({
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
        'type': {'type': 'str', 'default': 'qemu', 'choices': list(GUEST_TYPES)},
        'lxc': {'type': 'str'},
        'lxcpath': {'type': 'path'},
        'mountpoints': {'type': 'dict'},
        'config_dir': CONFIG_DIR,
    }, mutually_exclusive=[('include', 'exclude'), ('qmp', 'lxc'), ('agent', 'lxc'),
                           ('include', 'lxc'), ('exclude', 'lxc'), ('start', 'lxc')],
        # qmp for a VM is checked by the engine (a qemu entry with state=absent needs none)
        required_if=[('type', 'lxc', ('lxc',))])
