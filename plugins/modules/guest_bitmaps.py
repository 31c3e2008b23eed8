#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: guest_bitmaps
short_description: Remove guestvault's dirty bitmaps from a QEMU guest
version_added: 0.1.0
description:
  - Removes the persistent dirty bitmaps that guestvault keeps on a guest's disks, all of them or
    one chain's, like qmpbackup's C(cleanup --remove-bitmaps). Bitmaps of other tools are never
    touched.
  - Use it to retire a chain you no longer back up (each bitmap costs a little on every guest
    write) or before moving a guest's images elsewhere. The next V(auto) backup of a retired
    chain is a full one.
  - With O(orphans), only the bitmaps no stored backup and no live chain needs; with O(cleanup),
    also everything a killed run left (a block job still copying, its target node, the hidden
    directory it was writing). M(guestvault.backup.guest_info) lists both as RV(guestvault.backup.guest_info#module:leftovers).
  - Every backup of the guest clears the same leftovers by itself first; O(cleanup) is for
    doing it now, for example after an engine was killed and the next backup is hours away.
  - To list bitmaps, use M(guestvault.backup.guest_info).
  - A VM's only. Of an LXC container (registry C(type) V(lxc)), which has no disks and whose backups are
    always full, it fails before doing anything; C(guestvault-dump --cleanup <vmid>) on the
    node clears what a killed backup of a container left.
author:
  - guestvault developers (@guestvault)
extends_documentation_fragment:
  - guestvault.backup.guest
  - guestvault.backup.storage
  - guestvault.backup.backups
requirements:
  - qemu.qmp (Python) on the node
attributes:
  check_mode:
    description: Reports which bitmaps would be removed.
    support: full
  diff_mode:
    description: Shows each disk's bitmaps before and after.
    support: full
options:
  chain:
    description: Only this chain's bitmaps; default all of guestvault's.
    type: str
  orphans:
    description:
      - Only the orphan bitmaps, whose removal never changes what the next backup does. Those are
        the ones a killed run added, inconsistent ones, and (with O(storage) or O(dumpdir)) ones
        superseded by a newer backup of their chain on that storage.
    type: bool
    default: false
  cleanup:
    description:
      - Clear what killed runs left instead of removing bitmaps. Their block jobs are cancelled,
        their target nodes closed, their hidden directories removed (the one the run recorded,
        and any on O(storage) or O(dumpdir)), and orphan bitmaps removed (see O(orphans)).
    type: bool
    default: false
  state:
    description: V(absent) removes the bitmaps.
    type: str
    default: absent
    choices: [absent]
"""

EXAMPLES = r"""
- name: Retire chain "nightly" of guest 101
  guestvault.backup.guest_bitmaps:
    vmid: 101
    chain: nightly
    state: absent

- name: Remove every guestvault bitmap of a guest (shows what goes with --diff)
  guestvault.backup.guest_bitmaps:
    vmid: 101
    state: absent

- name: Clear what a killed backup left (job, target node, hidden directory, its bitmap)
  guestvault.backup.guest_bitmaps:
    vmid: 101
    storage: backup-nfs
    cleanup: true
"""

RETURN = r"""
removed:
  description: The bitmaps removed (or, in check mode, that would be).
  returned: always
  type: list
  elements: dict
  contains:
    disk:
      description: Device id.
      type: str
      sample: virtio0
    node:
      description: QEMU block node name.
      type: str
    name:
      description: Bitmap name.
      type: str
      sample: guestvault.nightly.20261121T010000Z
cleared:
  description:
    - With O(cleanup), the leftovers found and cleared (null otherwise), shaped as
      RV(guestvault.backup.guest_info#module:leftovers).
  returned: always
  type: dict
"""

from ansible_collections.guestvault.backup.plugins.module_utils._ansible import run_module
from ansible_collections.guestvault.backup.plugins.module_utils._argspec import guest_bitmaps_argument_spec
from ansible_collections.guestvault.backup.plugins.module_utils._engine.run.guest_bitmaps import GuestBitmapsRequest, run_guest_bitmaps


def main():
    run_module(guest_bitmaps_argument_spec(), run_guest_bitmaps, GuestBitmapsRequest, needs_qmp=True)


if __name__ == '__main__':
    main()
