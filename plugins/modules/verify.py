#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: verify
short_description: Re-read a backup and check it against its manifest
version_added: 0.1.0
description:
  - Reads every image a restore of the backup would read (its whole chain) and compares each
    with the sha256 digests in its backup's C(index.json) (one per segment of the file; one of
    the whole file for backups of older versions), runs C(qemu-img check) on the backup's own
    images, and checks that each incremental image reads through the parent image its manifest
    names.
  - Records the outcome as the backup's verify state (C(verify.json)), shown by
    M(guestvault.backup.backup_info). Fails when the backup is damaged, so a playbook stops.
  - A backup whose manifest cannot be read fails with the reason; nothing is recorded (there is
    no manifest to record it in). With O(backup=latest), a damaged newest backup is named in a
    warning and the newest good one is verified.
  - Many problems of one kind (a wrong key, a lost chunk directory) are summed up in one line
    with their count and the first few offsets.
author:
  - guestvault developers (@guestvault)
extends_documentation_fragment:
  - guestvault.backup.notify
  - guestvault.backup.storage
  - guestvault.backup.backups
  - guestvault.backup.backups.selection
requirements:
  - qemu-img (Debian package qemu-utils) on the node
attributes:
  check_mode:
    description: Checks, but does not record the verify state.
    support: full
  diff_mode:
    description: Not applicable.
    support: none
options:
  vmid:
    description: The guest whose backup to verify.
    type: int
    required: true
"""

EXAMPLES = r"""
- name: Verify last night's backup of every guest in the group
  guestvault.backup.verify:
    vmid: "{{ item }}"
    storage: backup-nfs
  loop: "{{ guest_vmids }}"
"""

RETURN = r"""
notifications:
  description:
    - What each notification target did with the call's notification - C(target), C(type),
      C(ok), and C(answer) (what its server answered) or C(error) (why it failed; also a
      warning). Empty when nothing was sent. Never holds a secret.
  returned: when a notification was due (not in check mode)
  type: list
  elements: dict
  sample: [{target: ops, type: sendmail, ok: true, answer: /usr/sbin/sendmail accepted the mail for ops@example.com}]
backup:
  description: Id of the verified backup.
  returned: always
  type: str
verify_state:
  description: V(ok) or V(failed).
  returned: always
  type: str
previous_state:
  description: The verify state before this run (V(none) if never verified).
  returned: always
  type: str
problems:
  description: What was wrong, one line each.
  returned: always
  type: list
  elements: str
chain:
  description: Times of the backups that were read, full first.
  returned: always
  type: list
  elements: str
"""

from ansible_collections.guestvault.backup.plugins.module_utils._ansible import run_module
from ansible_collections.guestvault.backup.plugins.module_utils._argspec import verify_argument_spec
from ansible_collections.guestvault.backup.plugins.module_utils._engine.run.verify import VerifyRequest, run_verify


def main():
    run_module(verify_argument_spec(), run_verify, VerifyRequest)


if __name__ == '__main__':
    main()
