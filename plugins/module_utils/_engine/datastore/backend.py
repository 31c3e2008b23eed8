"""The ``Backend`` seam: where a datastore on an object store keeps its objects.

A backend is dumb (as restic's ``internal/backend``): it knows keys and bytes, nothing of chunks,
snapshots or caches. Keys are ``/``-separated paths as a datastore directory lays them out
(``.chunks/XXXX/<digest hex>``, ``vm/<vmid>/<time>/index.json.blob``, ``.leases/...``), so a
backend holding a datastore holds PBS's layout.

What the datastore above relies on, and every backend must give (``tests/unit/
test_backend_contract.py`` and, for S3 on SeaweedFS, ``tests/integration/test_s3_backend.py``
check it):
- strong consistency: a put, a delete or a copy that has answered is seen by every later get,
  head and listing, from any node;
- ``put_new`` is atomic: of two writers of one key, exactly one learns it created it, and
  neither overwrites the other (S3's ``If-None-Match: *``);
- ``etag`` is the hex MD5 of an object's bytes (what S3 gives for an object put in one request);
  the cache of snapshot files compares it with its copies;
- ``modified`` is when the object was last put, on the backend's clock (epoch seconds): garbage
  collection sweeps by it and leases lapse by it, so nodes' clocks never decide;
- failures raise ``StorageError`` (a GuestvaultError) with a message that says what to fix.

Implementations: ``backends.s3.S3Bucket`` (boto3), ``backends.local.LocalBackend`` (a directory)
and ``backends.memory.MemoryBackend`` (a dict, for the unit tests). A datastore on a new object
store is one more class with these methods, plus its section in storage.cfg.
"""
from __future__ import annotations

from typing import Iterator, Optional, Protocol, Tuple, runtime_checkable


@runtime_checkable
class Backend(Protocol):
    label: str            # how messages name it: "bucket b on https://...", "directory /x"

    def check(self) -> None:
        """StorageError unless the backend is there and may be used."""

    def put(self, key: str, data: bytes) -> None:
        """Create or replace ``key``."""

    def put_new(self, key: str, data: bytes) -> bool:
        """Create ``key`` unless it exists: True when this call created it."""

    def get(self, key: str) -> Optional[bytes]:
        """The object's bytes, or None when there is no such key."""

    def head(self, key: str) -> Optional[dict]:
        """``{'size', 'etag', 'modified'}`` of the object, or None when there is no such key."""

    def copy(self, source: str, key: str) -> None:
        """Put a copy of ``source`` under ``key`` (a chunk verify found damaged: ``.bad``)."""

    def objects(self, prefix: str = '') -> Iterator[Tuple[str, int, str, float]]:
        """``(key, size, etag, modified)`` of every object under ``prefix``, in key order."""

    def folders(self, prefix: str) -> list:
        """The names of the "folders" right under ``prefix`` (which ends in ``/``): the next
        path part of every key below it."""

    def delete(self, keys) -> None:
        """Delete ``keys`` (any iterable); a missing key is no error."""
