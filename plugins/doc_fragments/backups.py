# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # How a module waits for a guest's lock (every verb that reads or changes its backups, and
    # guest_info, guest_bitmaps): the engine's run/opener.py and run/guest_runs.py.
    DOCUMENTATION = r"""
options:
  lockwait:
    description:
      - Minutes to wait while another run of the same guest holds it (a backup, prune, restore,
        verify or protect of its backups, or a guest_info or guest_bitmaps call). Each wait is
        reported as a warning that names what held the guest.
    type: float
    default: 180
"""

    # Which backup of the guest a module works on (run/opener.py resolves it).
    SELECTION = r"""
options:
  backup:
    description:
      - Which backup, V(latest) or its time (C(2026-11-22T01:00:00Z)) or id
        (C(vm/101/2026-11-22T01:00:00Z)).
      - V(latest) is the newest backup that can be read; passing over a damaged newer one is
        reported as a warning.
    type: str
    default: latest
"""
