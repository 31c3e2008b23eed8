# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # How every guestvault module reaches one guest (module_utils/_argspec.py _guest_options).
    DOCUMENTATION = r"""
options:
  vmid:
    description:
      - The guest's numeric id (100 to 999999999). Names its backups (C(vm/<vmid>/)).
      - Without O(qmp_socket), the guest is looked up in the node's guest registry
        C(<config_dir>/guests.d/<vmid>.conf).
    type: int
    required: true
  qmp_socket:
    description:
      - Path of the guest's QMP unix socket (C(-qmp unix:PATH,server=on,wait=off)), instead of
        the registry's C(qmp). QEMU serves one client per QMP socket at a time.
    type: path
  agent_socket:
    description:
      - Path of the host side of the guest agent's virtio-serial socket, instead of the
        registry's C(agent). Backups use it to freeze the guest's filesystems and to shut the
        guest down.
    type: path
"""
