# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # garbage_collect, verify and prune: their type=gc|verify|prune event (run/notices.py).
    DOCUMENTATION = r"""
options:
  notify:
    description:
      - When the operation's notification goes to the targets that the matchers of
        C(<config_dir>/notifications.cfg) choose (Proxmox VE's built-in C(default-matcher)
        sends everything to root's mail) - V(always), only when it fails (V(error)), or
        V(never), as the C(notify) setting of a Proxmox Backup Server datastore.
      - The event has the fields C(type) (V(gc), V(verify) or V(prune)), C(hostname),
        C(storage) (the storage's id, or the dumpdir) and, on a V(datastore) storage,
        C(datastore), as Proxmox Backup Server names it; its severity is V(error) when the
        operation failed, else V(info). Matchers' C(match-field) and C(match-severity) select by
        them.
      - A notification that cannot be delivered is a warning, never a failure of the task. A
        task refused for bad input, and check mode, notify nobody.
    type: str
    choices: [always, error, never]
    default: error
"""
