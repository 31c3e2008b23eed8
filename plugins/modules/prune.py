#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: prune
short_description: Remove old backups by Proxmox's retention rules, without breaking a chain
version_added: 0.1.0
description:
  - Applies a retention policy to one guest's (or every guest's) backups on a storage, with
    Proxmox's semantics exactly - V(keep-last), V(keep-hourly), V(keep-daily), V(keep-weekly),
    V(keep-monthly), V(keep-yearly) applied in that order, periods in local time (or
    O(timezone)), ISO weeks, a backup removed by an earlier rule stays removed; protected
    backups are never removed and never count toward a rule; no positive option keeps
    everything.
  - 'Reports for every backup whether it is kept and by which rule (C(daily #3) is the third day
    kept by O(keep_daily)), like the Proxmox prune simulator, and the bytes freed.'
  - Chain-safe - when a kept incremental backup reads through a backup that is removed, that
    backup's data is first folded into the kept one, so every kept backup restores bit-exact.
  - With O(simulate), nothing is read from or done to a storage - the given list of backups is
    marked as the policy would mark it.
  - The policy is O(prune_backups) or the O(keep_last)... options, else the storage's
    C(prune-backups) in C(storage.cfg), else the C(prune-backups) of C(vzdump.conf).
author:
  - guestvault developers (@guestvault)
extends_documentation_fragment:
  - guestvault.backup.notify
  - guestvault.backup.storage
  - guestvault.backup.backups
requirements:
  - qemu-img (Debian package qemu-utils) on the node
attributes:
  check_mode:
    description: Reports the marks and the bytes that would be freed; removes nothing.
    support: full
  diff_mode:
    description: Not applicable; the result lists every backup's mark.
    support: none
options:
  vmid:
    description: Only this guest's backups; default every guest on the storage.
    type: int
  prune_backups:
    description: The policy as a Proxmox property string, e.g. C(keep-last=3,keep-daily=13).
    type: str
  keep_all:
    description: Keep every backup.
    type: bool
  keep_last:
    description: Keep the newest N backups.
    type: int
  keep_hourly:
    description: Keep the newest backup of each of the last N hours that have one.
    type: int
  keep_daily:
    description: Keep the newest backup of each of the last N days that have one.
    type: int
  keep_weekly:
    description: Keep the newest backup of each of the last N ISO weeks that have one.
    type: int
  keep_monthly:
    description: Keep the newest backup of each of the last N months that have one.
    type: int
  keep_yearly:
    description: Keep the newest backup of each of the last N years that have one.
    type: int
  timezone:
    description: IANA time zone for hours, days, weeks, months and years; default the node's.
    type: str
  simulate:
    description:
      - A list of backups to mark instead of a storage's, each with C(time) (epoch seconds or
        ISO 8601) and optionally C(protected) and C(id).
    type: list
    elements: dict
"""

EXAMPLES = r"""
- name: Keep 3 daily, 2 weekly and 1 monthly backup of every guest on the storage
  guestvault.backup.prune:
    storage: backup-nfs
    keep_daily: 3
    keep_weekly: 2
    keep_monthly: 1

- name: What would the storage's own policy remove? (check mode)
  guestvault.backup.prune:
    storage: backup-nfs
    vmid: 101
  check_mode: true
  register: plan

- name: Show it
  ansible.builtin.debug:
    msg: "{{ plan.backups | map(attribute='id') | zip(plan.backups | map(attribute='mark')) | list }}"

- name: Try a policy on paper, like the Proxmox prune simulator
  guestvault.backup.prune:
    prune_backups: keep-last=2,keep-daily=3
    timezone: Europe/Berlin
    simulate:
      - {time: "2026-11-20T22:00:00Z"}
      - {time: "2026-11-21T22:00:00Z"}
      - {time: "2026-11-22T01:00:00Z", protected: true}
      - {time: "2026-11-22T22:00:00Z"}
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
backups:
  description: Every backup considered, newest first per guest, with its mark.
  returned: always
  type: list
  elements: dict
  contains:
    id:
      description: The backup's id (with O(simulate), the given id or the time).
      type: str
    time:
      description: Its point in time (UTC).
      type: str
    mark:
      description: V(keep), V(remove) or V(protected).
      type: str
    rule:
      description: 'The rule that keeps it, such as C(daily #3), C(last #1), C(keep-all) or
        C(protected); null for a removed backup.'
      type: str
    size:
      description: Bytes its files take (not with O(simulate)).
      type: int
removed:
  description: Ids of the backups removed (in check mode, that would be).
  returned: always
  type: list
  elements: str
damaged:
  description:
    - Ids of damaged backups (their manifest cannot be read) that prune left alone, neither
      counted among the kept backups nor removed.
    - A warning names each with the reason.
  returned: unless O(simulate)
  type: list
  elements: str
folded:
  description: Kept backups whose removed parents' data was folded into them, with their new parent.
  returned: unless O(simulate)
  type: list
  elements: dict
bytes_freed:
  description: Bytes freed (in check mode, the size of the backups that would be removed).
  returned: unless O(simulate)
  type: int
policy:
  description: The policy applied, as a property string.
  returned: always
  type: str
  sample: keep-daily=3,keep-weekly=2,keep-monthly=1
policy_source:
  description: Where the policy came from (C(given), C(storage NAME), C(vzdump.conf), or the default).
  returned: unless O(simulate)
  type: str
"""

from ansible_collections.guestvault.backup.plugins.module_utils._ansible import run_module
from ansible_collections.guestvault.backup.plugins.module_utils._argspec import prune_argument_spec
from ansible_collections.guestvault.backup.plugins.module_utils._engine.run.prune import PruneRequest, run_prune


def main():
    run_module(prune_argument_spec(), run_prune, PruneRequest)


if __name__ == '__main__':
    main()
