#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: garbage_collect
short_description: Remove the chunks of a datastore that no backup uses any more
version_added: 0.1.0
description:
  - Frees the space of pruned backups on a V(datastore) storage. Prune removes backups
    (snapshot directories) only; their chunks stay until a garbage collection finds that no
    remaining backup references them. This is Proxmox Backup Server's garbage collection, in
    its two phases.
  - Mark - the access time of every chunk that any index file references is set to now. Every
    fixed (C(.fidx)) and dynamic (C(.didx)) index under the datastore's backup groups
    (C(vm/), C(ct/), C(host/), in every namespace) counts, whatever its snapshot's manifest
    says, as Proxmox Backup Server's garbage collection does; so a snapshot whose manifest is
    damaged keeps its chunks until the manifest is repaired or the snapshot removed.
  - An index file that cannot be parsed (unknown magic, truncated, wrong size) stops the run
    before anything is marked or removed, in check mode too, and the error names the file.
  - Sweep - every chunk whose access time is older than the cutoff is removed, with chunks
    marked bad by verify. The cutoff is the start of the mark (or of the oldest backup still
    running, if it started earlier) minus O(grace).
  - Backups may run during a garbage collection; a chunk a running backup reuses or writes is
    never removed.
  - On a datastore in an S3 bucket, the mark happens in memory (an object's time cannot be
    set without copying it), the sweep lists the chunks and removes each one no backup
    references whose upload is older than now minus O(grace), with multi-object deletes. It
    runs on any node, and refuses while a backup writes into the bucket from any node (each
    running backup holds a lease in the bucket); such a backup waits for it in turn.
  - Reports the chunks and bytes removed and kept, and the datastore's deduplication factor.
    Chunks that indexes name but the store lacks are counted in RV(missing_chunks) and named in
    a warning with the snapshots that need them.
author:
  - guestvault developers (@guestvault)
extends_documentation_fragment:
  - guestvault.backup.notify
  - guestvault.backup.storage.config_dir
attributes:
  check_mode:
    description: Marks nothing and removes nothing; reports the numbers a real run would.
    support: full
  diff_mode:
    description: Not applicable; the result counts the chunks.
    support: none
options:
  storage:
    description: Id of a V(datastore) storage in C(<config_dir>/storage.cfg).
    type: str
    required: true
  grace:
    description:
      - How much older than the cutoff a chunk's access time must be before it is removed, as
        an age such as V(24h5m), V(1h), V(30m) or V(0s).
      - The default is Proxmox Backup Server's - a file system mounted C(relatime) updates an
        access time at most once a day, so a shorter grace is safe only where access times are
        always updated (C(strictatime)), or when no backup runs.
    type: str
    default: 24h5m
seealso:
  - module: guestvault.backup.prune
    description: Removes backups; a garbage collection then frees their chunks.
  - module: guestvault.backup.node_config
    description: Declares the V(datastore) storage.
"""

EXAMPLES = r"""
- name: Prune, then free the space of the pruned backups
  guestvault.backup.prune:
    storage: pbs
    keep_daily: 7
- name: Collect the garbage of the datastore
  guestvault.backup.garbage_collect:
    storage: pbs
  register: gc

- name: Show what it freed
  ansible.builtin.debug:
    msg: "removed {{ gc.removed_chunks }} chunks ({{ gc.removed_bytes | filesizeformat }}), dedup factor {{ gc.dedup_factor }}"

- name: What would a collection without grace remove? (check mode)
  guestvault.backup.garbage_collect:
    storage: pbs
    grace: 0s
  check_mode: true
"""

RETURN = r"""
notifications:
  description:
    - What each notification target did with the call's notification - C(target), C(type),
      C(ok), and C(answer) (what its server answered) or C(error) (why it failed; also a
      warning). Empty when nothing was sent. Never holds a secret.
  returned: when a notification was due (not in check mode)
  type: list
  elements: dict
  sample: [{target: ops, type: sendmail, ok: true, answer: /usr/sbin/sendmail accepted the mail for ops@example.com}]
index_files:
  description:
    - Index files read in the mark phase - one per disk of each backup, and one per archive of
      each container or host backup a Proxmox Backup Server wrote into the datastore.
  returned: always
  type: int
referenced_chunks:
  description: Distinct chunks that the indexes reference.
  returned: always
  type: int
missing_chunks:
  description:
    - Chunks that indexes reference but the store does not hold.
    - When not 0, a warning names the snapshots that need them (run verify on those).
  returned: always
  type: int
removed_chunks:
  description: Chunks removed (in check mode, that would be).
  returned: always
  type: int
removed_bytes:
  description: Bytes the removed chunks took (their stored, compressed or encrypted, size).
  returned: always
  type: int
kept_chunks:
  description: Chunks left in the store.
  returned: always
  type: int
kept_bytes:
  description: Bytes the kept chunks take.
  returned: always
  type: int
bad_chunks_removed:
  description: Copies of chunks that verify found corrupt (C(.bad) files) removed.
  returned: always
  type: int
logical_bytes:
  description: Bytes the backups hold when restored - the size of every chunk every index references, counted once per reference.
  returned: always
  type: int
dedup_factor:
  description: RV(logical_bytes) divided by the bytes the referenced chunks take in the store (1.0 for an empty store).
  returned: always
  type: float
  sample: 7.25
cutoff:
  description: Chunks whose access time was older than this (UTC, ISO 8601) were removed.
  returned: always
  type: str
  sample: "2026-03-09T02:55:00Z"
duration:
  description: Seconds the collection took.
  returned: always
  type: float
changed:
  description: Whether a chunk was removed (in check mode, would be).
  returned: always
  type: bool
"""

from ansible_collections.guestvault.backup.plugins.module_utils._ansible import run_module
from ansible_collections.guestvault.backup.plugins.module_utils._argspec import garbage_collect_argument_spec
from ansible_collections.guestvault.backup.plugins.module_utils._engine.run.garbage_collect import GarbageCollectRequest, run_garbage_collect


def main():
    run_module(garbage_collect_argument_spec(), run_garbage_collect, GarbageCollectRequest)


if __name__ == '__main__':
    main()
