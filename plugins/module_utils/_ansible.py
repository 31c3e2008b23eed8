# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The modules' shared tail: argument parsing, one engine call, and the Ansible result.

The only file under module_utils that imports Ansible; ``_engine`` stays plain Python so the
node command runs the same code without Ansible.
"""
from __future__ import annotations

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.guestvault.backup.plugins.module_utils._engine.errors import (
    GuestvaultError)
from ansible_collections.guestvault.backup.plugins.module_utils._engine.guest.qmp import (
    HAS_QEMU_QMP, QEMU_QMP_IMPORT_ERROR)
from ansible_collections.guestvault.backup.plugins.module_utils._engine.storage.directory import (
    lock_waits)


def run_module(module_spec, verb, request_type, needs_qmp=False):
    """Run one module: ``verb(request_type.from_params(params, check_mode))`` returns the
    result dict. ``module_spec`` is the module's options with their constraints (_argspec).

    A ``GuestvaultError`` becomes ``fail_json(msg=...)`` (with the error's ``result``, if it
    carries one); ``warnings`` in the result become Ansible warnings, and so does every wait for a
    lock (``lock_waits``: who held it, for how long); ``diff`` is returned only
    when the user asked for it (``--diff``). Every module supports check mode.
    """
    module = AnsibleModule(supports_check_mode=True, **module_spec)
    if needs_qmp and not HAS_QEMU_QMP:
        module.fail_json(msg=missing_required_lib('qemu.qmp'),
                         exception=str(QEMU_QMP_IMPORT_ERROR))
    # Every wait for a lock, whichever verb took it, is a warning: a run that waited says so.
    with lock_waits() as waits:
        try:
            result = verb(request_type.from_params(module.params, module.check_mode))
        except GuestvaultError as exc:
            for warning in waits:
                module.warn(warning)
            module.fail_json(msg=str(exc), **(getattr(exc, 'result', None) or {}))
    for warning in waits + (result.pop('warnings', None) or []):
        module.warn(warning)
    diff = result.pop('diff', None)
    if module._diff and diff is not None:
        result['diff'] = diff
    module.exit_json(**result)
