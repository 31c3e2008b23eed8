# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # Where backups live, and the node configuration that names storages.
    DOCUMENTATION = r"""
options:
  storage:
    description: Id of a directory storage in C(<config_dir>/storage.cfg).
    type: str
  dumpdir:
    description: A directory holding backups (C(<dumpdir>/vm/<vmid>/<time>/)), instead of O(storage).
    type: path
  config_dir:
    description: The node's guestvault configuration (C(vzdump.conf), C(storage.cfg), C(guests.d/)).
    type: path
    default: /etc/guestvault
"""
