#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: schedule_info
short_description: Simulate a Proxmox calendar event - the next runs of a backup schedule
version_added: 0.1.0
description:
  - Lists when a schedule (a Proxmox calendar event, as in C(jobs.cfg) and
    M(guestvault.backup.backup_job)) runs next, as Proxmox VE's schedule simulator does, and the
    systemd C(OnCalendar=) expressions a job's timer gets for it.
  - Warns when the schedule looks like Proxmox's trap where a lone number is a minute
    (C(mon..fri 23) runs at minute 23 of every hour; C(mon..fri 23:00) at 23:00).
  - Changes nothing.
author:
  - guestvault developers (@guestvault)
attributes:
  check_mode:
    description: Runs the same in check mode.
    support: full
  diff_mode:
    description: Not applicable.
    support: none
options:
  schedule:
    description: The calendar event, e.g. C(mon..fri 23:00), C(sun 01:00), C(daily), C(*:0/15).
    type: str
    required: true
  start_time:
    description:
      - Count runs strictly after this time, an ISO 8601 time with offset
        (C(2026-11-20T12:00:00Z)) or seconds since the epoch. Default now.
    type: str
  iterations:
    description: How many runs to list (1 to 1000).
    type: int
    default: 10
  timezone:
    description:
      - IANA time zone the schedule is evaluated in (C(Europe/Berlin)); default the local time
        of the host the module runs on. A schedule ending in C(UTC) always runs in UTC.
    type: str
"""

EXAMPLES = r"""
- name: When does the weeknight job run?
  guestvault.backup.schedule_info:
    schedule: mon..fri 23:00
    iterations: 5
    timezone: Europe/Berlin
  register: weeknights

- name: Show the next runs
  ansible.builtin.debug:
    var: weeknights.events
"""

RETURN = r"""
events:
  description: The next runs, ISO 8601 with the offset of the zone the schedule runs in.
  returned: always
  type: list
  elements: str
  sample: ['2026-11-20T23:00:00+01:00', '2026-11-23T23:00:00+01:00']
systemd_oncalendar:
  description:
    - The C(OnCalendar=) expressions a job's timer gets for this schedule; empty when systemd
      cannot run it exactly as Proxmox does (see RV(systemd_error)).
  returned: always
  type: list
  elements: str
  sample: ['Mon..Fri *-*-* 23:00:00 Europe/Berlin']
systemd_error:
  description: Why the schedule cannot be a systemd timer, and how to write it instead.
  returned: when the schedule cannot be translated
  type: str
normalized:
  description: The schedule with every field spelled out, as Proxmox reads it.
  returned: always
  type: str
  sample: mon..fri *-*-* 23:00:00
"""

from ansible_collections.guestvault.backup.plugins.module_utils._ansible import run_module
from ansible_collections.guestvault.backup.plugins.module_utils._argspec import schedule_info_argument_spec
from ansible_collections.guestvault.backup.plugins.module_utils._engine.run.schedule_info import ScheduleInfoRequest, run_schedule_info


def main():
    run_module(schedule_info_argument_spec(), run_schedule_info, ScheduleInfoRequest)


if __name__ == '__main__':
    main()
