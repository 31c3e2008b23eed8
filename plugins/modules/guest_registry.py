#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: guest_registry
short_description: Declare a guest in a node's registry (guests.d/<vmid>.conf)
version_added: 0.1.0
description:
  - Writes one guest's registry entry C(<config_dir>/guests.d/<vmid>.conf), which tells the
    other modules and the node command C(guestvault-dump) how to reach the guest (its QMP and
    guest agent sockets) and what to back up (O(include) or O(exclude) disks), and which pool
    and tags select it in jobs.
  - The entry is checked (socket paths absolute, pool and tag names, disk ids) and read back
    before it is written; the write is atomic. A file whose content already means the same is
    left alone, so a second run changes nothing.
  - O(state=absent) removes the entry; the guest and its backups are not touched.
author:
  - guestvault developers (@guestvault)
extends_documentation_fragment:
  - guestvault.backup.storage.config_dir
attributes:
  check_mode:
    description: Reports whether the entry would change, writing nothing.
    support: full
  diff_mode:
    description: The entry's file before and after.
    support: full
options:
  vmid:
    description: The guest's vmid (100 to 999999999).
    type: int
    required: true
  state:
    description: Whether the entry exists.
    type: str
    default: present
    choices: [present, absent]
  name:
    description: The guest's name (C(guestname) in notes templates).
    type: str
  qmp:
    description: Absolute path of the guest's QMP unix socket. Required with O(state=present).
    type: path
  agent:
    description: Absolute path of the guest agent's unix socket (for C(snapshot) mode fsfreeze).
    type: path
  pool:
    description: The pool the guest belongs to (jobs select guests by pool).
    type: str
  tags:
    description: Tags of the guest.
    type: list
    elements: str
  include:
    description: Device ids of the only disks to back up (e.g. C(virtio0)).
    type: list
    elements: str
  exclude:
    description: Device ids of disks not to back up. Not together with O(include).
    type: list
    elements: str
  start:
    description: Command that starts the guest again after a C(stop) mode backup.
    type: str
  description:
    description: A free text description; several lines are kept as several lines.
    type: str
"""

EXAMPLES = r"""
- name: Register guest 101
  guestvault.backup.guest_registry:
    vmid: 101
    name: web01
    qmp: /run/qemu/101.qmp
    agent: /run/qemu/101.qga
    pool: production
    tags: [web, critical]
    exclude: [virtio2]
    start: systemctl start qemu@101

- name: Forget guest 102 (its backups stay)
  guestvault.backup.guest_registry:
    vmid: 102
    state: absent
"""

RETURN = r"""
path:
  description: The entry's file.
  returned: always
  type: str
  sample: /etc/guestvault/guests.d/101.conf
entry:
  description: The declared entry (empty with O(state=absent)).
  returned: always
  type: dict
  sample: {vmid: 101, name: web01, qmp: /run/qemu/101.qmp, agent: null, pool: production,
           tags: [web], include: [], exclude: [virtio2], start: null, description: null}
"""

from ansible_collections.guestvault.backup.plugins.module_utils._ansible import run_module
from ansible_collections.guestvault.backup.plugins.module_utils._argspec import guest_registry_argument_spec
from ansible_collections.guestvault.backup.plugins.module_utils._engine.run.guest_registry import GuestRegistryRequest, run_guest_registry


def main():
    run_module(guest_registry_argument_spec(), run_guest_registry, GuestRegistryRequest)


if __name__ == '__main__':
    main()
