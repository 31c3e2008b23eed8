#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: backup_info
short_description: List the backups on a storage
version_added: 0.1.0
description:
  - Lists one guest's backups, or every guest's, on a storage, oldest first, with time, level,
    chain, size, protection, notes and verify state; flat records made for C(json_query) and
    C(selectattr) in playbooks.
  - Changes nothing.
author:
  - guestvault developers (@guestvault)
extends_documentation_fragment:
  - guestvault.backup.storage
attributes:
  check_mode:
    description: Read-only; runs the same in check mode.
    support: full
  diff_mode:
    description: Read-only.
    support: none
options:
  vmid:
    description: Only this guest's backups; default every guest's.
    type: int
"""

EXAMPLES = r"""
- name: All backups on the NFS storage
  guestvault.backup.backup_info:
    storage: backup-nfs
  register: found

- name: Protected backups of guest 101
  ansible.builtin.debug:
    msg: "{{ found.backups | selectattr('vmid', 'equalto', 101) | selectattr('protected') | map(attribute='id') | list }}"

- name: Backups never verified (needs community.general for json_query)
  ansible.builtin.debug:
    msg: "{{ found.backups | community.general.json_query(\"[?verify_state=='none'].id\") }}"
"""

RETURN = r"""
storage:
  description: The storage id (null with a dumpdir).
  returned: always
  type: str
storage_path:
  description: The storage's directory.
  returned: always
  type: str
backups:
  description: The backups, oldest first.
  returned: always
  type: list
  elements: dict
  contains:
    id:
      description: C(vm/<vmid>/<time>).
      type: str
    vmid:
      description: The guest.
      type: int
    time:
      description: Point in time (UTC, ISO 8601).
      type: str
    epoch:
      description: The same as seconds since the epoch.
      type: int
    guest_name:
      description: The guest's name then.
      type: str
    level:
      description: V(full), V(inc) or V(copy).
      type: str
    chain:
      description: The chain it belongs to.
      type: str
    parent:
      description: Time of the backup an incremental builds on.
      type: str
    mode:
      description: Consistency mode it was taken in.
      type: str
    size:
      description: Bytes its files take.
      type: int
    protected:
      description: Whether it is protected.
      type: bool
    notes:
      description: Its notes.
      type: str
    verify_state:
      description: V(ok), V(failed) or V(none) (never verified).
      type: str
    verified_at:
      description: When it was last verified.
      type: str
    path:
      description: Its directory.
      type: str
    disks:
      description: Its disks (id, virtual_size, level, size, bytes_written).
      type: list
      elements: dict
damaged:
  description:
    - Backup directories whose manifest cannot be read, oldest first per guest. They are not in
      RV(backups) - nothing can be restored from them until the manifest is restored from a copy - and
      each is also named in a warning.
    - Restore and verify of one of them say what is wrong; C(latest) and O(guestvault.backup.guest_backup#module:level=auto)
      warn and use the newest good backup; prune neither counts nor removes them; garbage
      collection keeps their chunks.
  returned: always
  type: list
  elements: dict
  contains:
    id:
      description: C(vm/<vmid>/<time>).
      type: str
    vmid:
      description: The guest.
      type: int
    time:
      description: Point in time (UTC, ISO 8601), from the directory's name.
      type: str
    epoch:
      description: The same as seconds since the epoch.
      type: int
    path:
      description: Its directory.
      type: str
    reason:
      description: Why its manifest cannot be read (the file and the error).
      type: str
"""

from ansible_collections.guestvault.backup.plugins.module_utils._ansible import run_module
from ansible_collections.guestvault.backup.plugins.module_utils._argspec import backup_info_argument_spec
from ansible_collections.guestvault.backup.plugins.module_utils._engine.run.backup_info import BackupInfoRequest, run_backup_info


def main():
    run_module(backup_info_argument_spec(), run_backup_info, BackupInfoRequest)


if __name__ == '__main__':
    main()
