"""The opener of a guest's backups: the checks every verb on them starts with.

A verb that works on one guest's backups (protect, verify, restore, file_restore) starts with::

    with open_backups(request, 'protect', shared=request.check_mode) as opened:
        opened.record ...

(prune and guest_backup take the same lock with ``guest_lock``), which does the checks every
such verb needs, in this order: the vmid, the storage (a storage
id or a dumpdir), the private umask for what it writes, the guest's lock on the storage (shared
or exclusive, waiting up to ``request.lockwait`` minutes and saying who holds it), and the backup
(``latest``, a time or an id, or ``until``), with catalog.resolve's warnings of damaged backups.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager

from ..guest.registry import validate_vmid
from ..storage import catalog
from ..storage.files import private_files
from . import guest_runs
from .locate import require_storage


@dataclasses.dataclass
class Opened:
    """What ``open_backups`` yields: the guest, its storage, and the backup once resolved."""
    vmid: int
    storage: object               # a storage.base.Storage
    request: object
    warnings: list = dataclasses.field(default_factory=list)
    record: object = None         # the backup, after resolve()

    def resolve(self):
        """The backup the request names (``backup``: latest, a time or an id; or ``until``);
        passing over a damaged backup adds a warning. Raises what catalog.resolve raises."""
        self.record = catalog.resolve(self.storage, self.vmid, getattr(self.request, 'backup', None),
                                      getattr(self.request, 'until', None),
                                      warnings=self.warnings)
        return self.record


@contextmanager
def guest_lock(storage, vmid, verb, lockwait, shared):
    """The private umask and guest ``vmid``'s lock on ``storage``, waiting up to ``lockwait``
    minutes; the holder file names ``verb`` for whoever waits."""
    with private_files(), storage.guest_lock(vmid, float(lockwait) * 60, shared=shared,
                                             holder=guest_runs.holder(vmid, verb)):
        yield


@contextmanager
def open_backups(request, verb, shared, resolve=True):
    """The checks of a verb on a guest's backups (see the module's docstring). ``request``
    has ``vmid``, ``storage``, ``dumpdir``, ``config_dir`` and ``lockwait`` (and ``backup`` /
    ``until``); with ``resolve`` false the verb resolves later (``opened.resolve()``), after
    checks of its own that must come first."""
    vmid = validate_vmid(request.vmid)
    storage = require_storage(request.config_dir, request.storage, request.dumpdir)
    with guest_lock(storage, vmid, verb, request.lockwait, shared):
        opened = Opened(vmid, storage, request)
        if resolve:
            opened.resolve()
        yield opened
