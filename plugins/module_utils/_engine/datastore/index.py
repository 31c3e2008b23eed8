"""The ``Index`` seam: what every index kind offers its readers, as PBS's ``IndexFile`` trait
(pbs-datastore/src/index.rs) does for ``FixedIndexReader`` and ``DynamicIndexReader``.

A fixed index (``.fidx``, a disk image in equal chunks) and a dynamic index (``.didx``, a file
archive cut by content) differ only in how a chunk's place in the image is found; garbage
collection, verify, restore and the NBD export read either through this protocol, and
``read_index`` picks the kind by the file's magic. A new index kind is then one reader class.
"""
from __future__ import annotations

from typing import Iterator, Protocol, Set, Tuple, runtime_checkable

from ..errors import CorruptData, StorageError
from .dynamic_index import parse_dynamic_index
from .file_formats import DYNAMIC_INDEX_MAGIC, MAGIC_SIZE
from .fixed_index import parse_fixed_index


@runtime_checkable
class Index(Protocol):
    """One index file in memory (``FixedIndex``, ``DynamicIndex``)."""

    uuid: bytes
    ctime: int
    index_csum: bytes       # as the header says: SHA-256 over the digest area

    @property
    def count(self) -> int:
        """How many chunks the index names (PBS: ``index_count``)."""

    @property
    def size(self) -> int:
        """The bytes of the image or archive the chunks make (PBS: ``index_bytes``)."""

    def digest(self, position: int) -> bytes:
        """The 32-byte digest of chunk ``position``; IndexError outside ``0..count``."""

    def chunk_range(self, position: int) -> Tuple[int, int]:
        """``(start, end)`` of chunk ``position`` in the image (PBS: ``chunk_info``)."""

    def chunk_at(self, offset: int) -> Tuple[int, int]:
        """``(position, offset within that chunk)`` of an image offset (PBS:
        ``chunk_from_offset``); IndexError outside the image."""

    def __iter__(self) -> Iterator[Tuple[int, int, int, bytes]]:
        """``(position, start, length, digest)`` of every chunk, in order."""

    def distinct_digests(self) -> Set[bytes]:
        """Every digest the index names, once (garbage collection's mark)."""

    def compute_csum(self) -> bytes:
        """SHA-256 over the digest area as it lies in the file, to compare with the manifest."""


def index_kind(path):
    """'dynamic index' for a ``.didx`` file name, else 'fixed index' (for messages)."""
    return 'dynamic index' if str(path).endswith('.didx') else 'fixed index'


def read_index(path, check_csum=True):
    """The index in ``path``, fixed or dynamic as its magic says (a file of neither magic is
    read as a fixed index, whose parser names what it found instead). ``StorageError`` when the
    file is gone, ``CorruptData`` when it cannot be read or parsed, each naming the file."""
    path = str(path)
    try:
        with open(path, 'rb') as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise StorageError(f"the {index_kind(path)} {path} is missing") from None
    except OSError as exc:
        raise CorruptData(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if raw[:MAGIC_SIZE] == DYNAMIC_INDEX_MAGIC:
        return parse_dynamic_index(raw, path, check_csum)
    return parse_fixed_index(raw, path, check_csum)
