"""A datastore storage with its format, built in one place (run/locate.py calls it).

The storage, its snapshot codec, its chunk store and the Datastore format hold each other: the
format reads and writes chunks and snapshots of its storage, and the storage hands its format
to whoever opens it (``format_of``). Wiring them here keeps the knowledge of which chunk store
goes with which backend inside the datastore package.
"""
from __future__ import annotations

from .format import Datastore
from .object_chunks import ObjectChunkStore
from .object_mirror import ObjectMirror
from .snapshot import SnapshotCodec
from .storage import DatastoreStorage


def build_datastore(path, storage_id, crypt=None, bucket=None):
    """The storage of a ``datastore:`` section: in the directory ``path``, or in ``bucket`` (a
    Backend: an S3Bucket, or a MemoryBackend in the unit tests) with ``path`` as its cache;
    ``crypt`` is the loaded key, if storage.cfg names one."""
    codec = SnapshotCodec(crypt)
    if bucket is not None:
        store = DatastoreStorage(path, storage_id, codec, ObjectMirror(bucket))
        store.format = Datastore(store, crypt, chunks=ObjectChunkStore(bucket, store.path))
    else:
        store = DatastoreStorage(path, storage_id, codec)
        store.format = Datastore(store, crypt)
    return store
