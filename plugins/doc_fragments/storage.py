# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # Where backups live, and the node configuration that names storages.
    DOCUMENTATION = r"""
options:
  storage:
    description:
      - Id of a storage in C(<config_dir>/storage.cfg) - a directory storage (V(dir), V(nfs),
        V(cifs)), which holds qcow2 chains, or a V(datastore), which holds Proxmox Backup
        Server's deduplicating chunk store.
      - A datastore whose C(encryption-key) names a key file (see
        M(guestvault.backup.encryption_key)) encrypts its backups with that key, unlocked with
        its C(encryption-passphrase-file).
    type: str
  dumpdir:
    description: A directory holding backups (C(<dumpdir>/vm/<vmid>/<time>/)), instead of O(storage).
    type: path
  config_dir:
    description: The node's guestvault configuration (C(vzdump.conf), C(storage.cfg), C(guests.d/)).
    type: path
    default: /etc/guestvault
"""

    # The node's configuration alone, for modules that name no storage of backups.
    CONFIG_DIR = r"""
options:
  config_dir:
    description: The node's guestvault configuration (C(vzdump.conf), C(storage.cfg), C(guests.d/)).
    type: path
    default: /etc/guestvault
"""
