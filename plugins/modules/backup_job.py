#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: backup_job
short_description: Declare a scheduled backup job on a node (jobs.cfg and a systemd timer)
version_added: 0.1.0
description:
  - Writes one job into the node's C(jobs.cfg) (Proxmox syntax, a C(vzdump) section) and a systemd
    timer and service that run the node command C(guestvault-dump --job <id>) on the job's
    schedule. The node then runs the job by itself, whether or not the controller is up.
  - O(schedule) is a Proxmox calendar event (C(mon..fri 23:00), C(sun 01:00), C(daily), ...),
    translated into equivalent C(OnCalendar=) lines. In Proxmox a lone number is a minute -
    C(mon..fri 22) runs at minute 22 of every hour; the module warns when a schedule looks like
    that mistake.
  - O(enabled=false) keeps the job in C(jobs.cfg) but removes its timer; O(state=absent) removes
    both. Idempotent; C(--diff) shows the job and the units before and after.
  - When systemd runs on the node, the timer is enabled and started (C(systemctl enable --now)).
author:
  - guestvault developers (@guestvault)
extends_documentation_fragment:
  - guestvault.backup.storage.config_dir
attributes:
  check_mode:
    description: Reports whether the job or its units would change, writing nothing.
    support: full
  diff_mode:
    description: The job's C(jobs.cfg) section and its timer and service, before and after.
    support: full
options:
  id:
    description: The job's id (letters, digits, C(-), C(_); starts with a letter).
    type: str
    required: true
  state:
    description: Whether the job exists.
    type: str
    default: present
    choices: [present, absent]
  schedule:
    description: When the job runs, a Proxmox calendar event. Required with O(state=present).
    type: str
  vmid:
    description: The guests to back up.
    type: list
    elements: int
  all:
    description: Back up every guest in the node's registry.
    type: bool
  pool:
    description: Back up the guests of this pool (registry C(pool:)).
    type: str
  exclude:
    description: Guests to leave out (with O(all) or O(pool)).
    type: list
    elements: int
  node:
    description: The nodes that run the job (by host name); default every node it is deployed to.
    type: list
    elements: str
  storage:
    description:
      - Storage id from C(storage.cfg) of the node (see the M(guestvault.backup.node_config) module), a directory storage or a V(datastore).
      - A storage that C(storage.cfg) does not define is refused and nothing is written; in check mode it is a warning, since an earlier task may still add it.
    type: str
  dumpdir:
    description: Backup directory instead of O(storage).
    type: path
  mode:
    description: Consistency mode.
    type: str
    choices: [snapshot, suspend, stop]
  level:
    description: Backup level (see M(guestvault.backup.guest_backup)); default V(auto).
    type: str
    choices: [full, inc, auto, copy]
  chain:
    description: Chain name.
    type: str
  chain_period:
    description:
      - V(monthly) starts a new chain (a full backup) when a calendar month begins; needs O(level=auto)
        (the default of the node command). Written as C(chain-period) in jobs.cfg.
    type: str
    choices: [none, monthly]
  compress:
    description: Compression, as vzdump's C(compress) (see M(guestvault.backup.guest_backup)).
    type: str
    choices: ['0', '1', gzip, lzo, zstd]
  prune_backups:
    description: Retention after each guest's backup, e.g. C(keep-daily=3,keep-weekly=2,keep-monthly=1).
    type: str
  notes_template:
    description: Notes template (mark the value C(!unsafe) in playbooks).
    type: str
  bwlimit:
    description: KiB/s per guest.
    type: int
  script:
    description: Hook script.
    type: path
  protected:
    description: Protect the job's backups.
    type: bool
  repeat_missed:
    description: Run once as soon as the node is back when runs were missed while it was down.
    type: bool
    default: false
  enabled:
    description: Whether the timer is installed.
    type: bool
    default: true
  comment:
    description: A comment stored with the job.
    type: str
  unit_dir:
    description: Where the systemd units are written.
    type: path
    default: /etc/systemd/system
  command:
    description: The node command the service runs.
    type: path
    default: /usr/local/sbin/guestvault-dump
"""

EXAMPLES = r"""
- name: Weekdays at 23:00, three daily, two weekly and one monthly backup kept
  guestvault.backup.backup_job:
    id: weeknights
    schedule: mon..fri 23:00
    all: true
    storage: backup-nfs
    mode: snapshot
    prune_backups: keep-daily=3,keep-weekly=2,keep-monthly=1
    repeat_missed: true

- name: Sundays at 01:00, a full backup of two guests
  guestvault.backup.backup_job:
    id: sunday-full
    schedule: sun 01:00
    vmid: [101, 102]
    level: full
    storage: backup-nfs

- name: Pause a job without losing its definition
  guestvault.backup.backup_job:
    id: weeknights
    schedule: mon..fri 23:00
    all: true
    storage: backup-nfs
    enabled: false

- name: Remove a job and its timer
  guestvault.backup.backup_job:
    id: sunday-full
    state: absent
"""

RETURN = r"""
units:
  description: The systemd units of the job (empty when disabled or absent).
  returned: always
  type: list
  elements: str
  sample: [/etc/systemd/system/guestvault-job-weeknights.timer]
enabled:
  description: Whether the job's timer is installed.
  returned: always
  type: bool
systemd:
  description: Whether systemd was told (daemon-reload, enable/disable); false where systemd does not run.
  returned: always
  type: bool
"""

from ansible_collections.guestvault.backup.plugins.module_utils._ansible import run_module
from ansible_collections.guestvault.backup.plugins.module_utils._argspec import backup_job_argument_spec
from ansible_collections.guestvault.backup.plugins.module_utils._engine.run.backup_job import BackupJobRequest, run_backup_job


def main():
    run_module(backup_job_argument_spec(), run_backup_job, BackupJobRequest)


if __name__ == '__main__':
    main()
