#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: guest_registry
short_description: Declare a guest (VM or container) in a node's registry (guests.d/<vmid>.conf)
version_added: 0.1.0
description:
  - Writes one guest's registry entry C(<config_dir>/guests.d/<vmid>.conf), which tells the
    other modules and the node command C(guestvault-dump) how to reach the guest (a VM's QMP and
    guest agent sockets, a container's LXC name and directory) and what to back up (a VM's
    O(include) or O(exclude) disks, a container's O(mountpoints) with C(backup=1)), and which
    pool and tags select it in jobs.
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
  type:
    description:
      - The guest's kind, as Proxmox VE names them. C(qemu) is a QEMU VM reached over O(qmp);
        C(lxc) is an LXC container named by O(lxc).
    type: str
    default: qemu
    choices: [qemu, lxc]
  qmp:
    description:
      - Absolute path of the guest's QMP unix socket. Required for O(type=qemu) with
        O(state=present); not with O(type=lxc).
    type: path
  lxc:
    description:
      - The LXC container's name (as C(lxc-ls) lists it). Required with O(type=lxc).
    type: str
  lxcpath:
    description:
      - The directory holding the container (C(lxc-* -P)). When not given, C(/var/lib/lxc).
      - Only with O(type=lxc).
    type: path
  mountpoints:
    description:
      - Volumes of the container, in Proxmox VE's syntax, by key C(mp0) to C(mp255); each value
        is C(<host directory>,mp=<path in the container>[,backup=1]).
      - Only those with C(backup=1) are backed up with the rootfs. A volume is mounted into
        the container by its own C(lxc.mount.entry); other mount entries are never backed up.
      - Only with O(type=lxc).
    type: dict
  agent:
    description:
      - Absolute path of the guest agent's unix socket (for C(snapshot) mode fsfreeze).
      - Only with O(type=qemu).
    type: path
  pool:
    description: The pool the guest belongs to (jobs select guests by pool).
    type: str
  tags:
    description: Tags of the guest.
    type: list
    elements: str
  include:
    description: Device ids of the only disks to back up (e.g. C(virtio0)). Only with O(type=qemu).
    type: list
    elements: str
  exclude:
    description: Device ids of disks not to back up. Not together with O(include). Only with O(type=qemu).
    type: list
    elements: str
  start:
    description: Command that starts the guest again after a C(stop) mode backup. Only with O(type=qemu); a container is started with C(lxc-start).
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

- name: Register container 300 (an LXC container named web) with one volume backed up
  guestvault.backup.guest_registry:
    vmid: 300
    type: lxc
    lxc: web
    lxcpath: /srv/lxc
    mountpoints:
      mp0: /srv/web-data,mp=/var/www,backup=1

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
           tags: [web], include: [], exclude: [virtio2], start: null, description: null,
           type: qemu, lxc: null, lxcpath: null, mountpoints: {}}
"""

from ansible_collections.guestvault.backup.plugins.module_utils._ansible import run_module
from ansible_collections.guestvault.backup.plugins.module_utils._argspec import guest_registry_argument_spec
from ansible_collections.guestvault.backup.plugins.module_utils._engine.run.guest_registry import GuestRegistryRequest, run_guest_registry


def main():
    run_module(guest_registry_argument_spec(), run_guest_registry, GuestRegistryRequest)


if __name__ == '__main__':
    main()
