#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: protect
short_description: Protect a backup from removal, and set its notes
version_added: 0.1.0
description:
  - Sets or clears the protection of one backup (its C(.protected) file, as Proxmox) and its
    notes. A protected backup is never removed by M(guestvault.backup.prune) and does not count
    toward any retention rule.
  - A configured storage's C(max-protected-backups) (Proxmox default 5, V(-1) unlimited) caps the
    protected backups of each guest on it; a backup directory given by O(dumpdir) has no cap.
  - Changes only what differs; C(--diff) shows the state before and after.
author:
  - guestvault developers (@guestvault)
extends_documentation_fragment:
  - guestvault.backup.storage
  - guestvault.backup.backups
  - guestvault.backup.backups.selection
attributes:
  check_mode:
    description: Reports whether anything would change.
    support: full
  diff_mode:
    description: Protection and notes before and after.
    support: full
options:
  vmid:
    description: The guest whose backup it is.
    type: int
    required: true
  protected:
    description: Protect (V(true)) or unprotect (V(false)); unchanged when not given.
    type: bool
  notes:
    description: The backup's notes; an empty string removes them; unchanged when not given.
    type: str
"""

EXAMPLES = r"""
- name: Keep the backup taken before the upgrade
  guestvault.backup.protect:
    vmid: 101
    storage: backup-nfs
    backup: "2026-11-20T22:00:00Z"
    protected: true
    notes: before the PostgreSQL 17 upgrade

- name: Release it again
  guestvault.backup.protect:
    vmid: 101
    storage: backup-nfs
    backup: "2026-11-20T22:00:00Z"
    protected: false
"""

RETURN = r"""
backup:
  description: Id of the backup.
  returned: always
  type: str
  sample: vm/101/2026-11-20T22:00:00Z
protected:
  description: Whether it is protected now.
  returned: always
  type: bool
notes:
  description: Its notes now.
  returned: always
  type: str
"""

from ansible_collections.guestvault.backup.plugins.module_utils._ansible import run_module
from ansible_collections.guestvault.backup.plugins.module_utils._argspec import protect_argument_spec
from ansible_collections.guestvault.backup.plugins.module_utils._engine.run.protect import ProtectRequest, run_protect


def main():
    run_module(protect_argument_spec(), run_protect, ProtectRequest)


if __name__ == '__main__':
    main()
