"""garbage_collect: free the chunks of a datastore that no snapshot names any more.

Proxmox Backup Server's two phases: mark (every chunk an index names gets its access time set)
and sweep (chunks whose access time is older than the cutoff go). The cutoff is the start of the
mark, or of the oldest backup still running if that is earlier, minus ``grace`` (PBS's 24 h 5 min
by default), so a backup that runs during GC never loses a chunk, whether it wrote it or found it
already stored. Prune removes snapshots only; this is what gives their space back.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..paths import CONFIG_DIR
from ..storage.files import private_files
from ..times import parse_age
from .locate import format_of, require_storage
from .notices import notified_operation
from .request import Request

DEFAULT_GRACE = '24h5m'


@dataclass
class GarbageCollectRequest(Request):
    storage: str = None
    grace: str = DEFAULT_GRACE
    config_dir: str = CONFIG_DIR
    notify: str = 'never'        # always, error or never: the type=gc notification
    check_mode: bool = False


def run_garbage_collect(request, log=None, progress=None):
    """Collect the garbage of one datastore; the counts (see garbage_collect's RETURN), and
    its notification as ``request.notify`` says."""
    return notified_operation('gc', request, lambda: _collect(request, log, progress),
                              _gc_summary, log=log)


def _gc_summary(result):
    return (f"Removed {result['removed_chunks']} chunks ({result['removed_bytes']} bytes), kept "
            f"{result['kept_chunks']} ({result['kept_bytes']} bytes), dedup factor "
            f"{result['dedup_factor']:.2f}; {result['missing_chunks']} chunks missing.")


def _collect(request, log, progress):
    log = log or (lambda message: None)
    if not request.storage:
        raise ConfigError("storage is required: the id of a datastore in storage.cfg")
    grace = parse_age(request.grace, 'grace', allow_zero=True)
    store = require_storage(request.config_dir, request.storage)
    if store.kind != 'datastore':
        raise ConfigError(f"{store.label} is a {store.kind} storage of qcow2 chains; garbage "
                          "collection is for datastores (prune frees a chain's space itself)")
    with private_files():
        stats = format_of(store).collect_garbage(grace, check_mode=request.check_mode,
                                                 progress=progress)
    log(f"garbage collection of {store.label}: removed {stats['removed_chunks']} chunks "
        f"({stats['removed_bytes']} bytes), kept {stats['kept_chunks']} "
        f"({stats['kept_bytes']} bytes), dedup factor {stats['dedup_factor']:.2f}"
        + (" (check mode: nothing removed)" if request.check_mode else ""))
    return dict(stats, changed=bool(stats['removed_chunks']),
                storage=store.id, storage_path=store.path, grace_seconds=grace)
