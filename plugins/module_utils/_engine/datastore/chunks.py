"""The ChunkStore protocol: where a datastore's chunks live, as the pipelines and the one GC use
it (docs/architecture.md, "One chunk-store interface").

Implementations: ``chunk_store.FileChunkStore`` (``.chunks/XXXX/<digest>`` files on a local file
system: O_DIRECT, access-time marks, PBS's rules) and ``object_chunks.ObjectChunkStore`` (chunks as
objects of a ``backend.Backend``, with empty local markers as a cache). Both pass
tests/chunk_store_contract.py; tests/unit/test_chunk_store_contract.py checks each has every
member with a compatible signature. Digests are the 32 raw bytes (or their hex, where noted).
A store may also offer ``read_into(digest, buffer)`` (``FileChunkStore``: an ``O_DIRECT`` read
into a caller's page-aligned buffer); a restore reads through it when it is there, else through
``read`` (image_restore.read_blob).
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Protocol, Tuple, runtime_checkable


@runtime_checkable
class ChunkStore(Protocol):
    """A datastore's chunks: each a DataBlob named by its digest, written once, never changed."""

    where: str          # how messages name the place the chunks are kept

    # -- the store --------------------------------------------------------------------------
    def exists(self) -> bool:
        """Whether the store has been created."""

    def create(self) -> None:
        """Create the store (PBS's layout); finishes an interrupted creation."""

    def check(self) -> None:
        """StorageError when the store is not there (a reader never creates it)."""

    def prepare(self) -> None:
        """Before a backup writes: the store exists and can take chunks."""

    def sync(self) -> None:
        """Every chunk inserted with ``durable=False`` is durable (before an index names it)."""

    # -- chunks -----------------------------------------------------------------------------
    def chunk_path(self, digest) -> str:
        """The local file of a chunk (the chunk itself, or its marker in the cache)."""

    def contains(self, digest) -> bool:
        """Whether the chunk is stored."""

    def missing(self, digests: Iterable) -> List:
        """The digests of ``digests`` that have no chunk in the store."""

    def insert(self, digest, blob, durable: bool = True) -> Tuple[bool, int]:
        """Store a chunk unless it is there already: ``(duplicate, size stored)``."""

    def read(self, digest) -> bytes:
        """The raw blob of a chunk; CorruptData when it is missing."""

    def read_view(self, digest):
        """``read`` without a copy: valid until this thread's next ``read_view``."""

    def touch(self, digest, must_exist: bool = True) -> bool:
        """Mark a chunk in use now (GC's mark); False if it is missing and ``must_exist`` is
        false, CorruptData if it must exist."""

    def touch_if_present(self, digest) -> bool:
        """Whether a usable copy is stored, marking it in use when it is: what a backup does
        before it refers to a chunk it did not write."""

    def mark_bad(self, digest) -> Optional[str]:
        """Set a corrupt chunk aside as PBS's verify does (``<hex>.<n>.bad``), so the next
        backup stores it again; where it went, or None if it is not there."""

    # -- garbage collection (datastore/gc.py) ------------------------------------------------
    def gc_check(self) -> None:
        """Before a GC: the store is there and may be collected."""

    def gc_mark(self, referenced) -> set:
        """Mark every referenced chunk (hex digests); the ones that are missing."""

    def gc_sweep(self, referenced, cutoff, protect_from, check_mode, result, progress) -> set:
        """Remove every chunk older than ``cutoff`` that no index needs (none in check mode,
        which only counts); the chunk names present."""
