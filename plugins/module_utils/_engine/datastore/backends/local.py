"""A ``Backend`` in a directory: each key a file under ``root`` (``a/b/c`` is ``root/a/b/c``).

Writes go through a hidden temporary file beside the target, fsynced and renamed (or linked, for
``put_new``, so a rival writer is refused, not overwritten), with the directory fsynced after:
a crash leaves the old object or the new one, never half of one, and listings skip the hidden
temporaries. ``modified`` is the file's mtime. It keeps the contract of ``datastore/backend.py``
for a directory one node uses, or a shared file system that is strongly consistent.

A local datastore keeps its chunks through ``chunk_store.FileChunkStore`` (O_DIRECT, access-time
marks, as PBS does) rather than through this class; it is here so that any datastore code
written against a Backend runs on a directory, and as the reference the contract tests hold the
other backends to.
"""
from __future__ import annotations

import hashlib
import os

from ...errors import StorageError
from ...storage.files import write_file_hidden


class LocalBackend:
    def __init__(self, root):
        self.root = os.fspath(root)
        self.label = f"directory {self.root}"

    def _path(self, key):
        parts = key.split('/')
        if not key or key.startswith('/') or any(p in ('', '.', '..') for p in parts):
            raise StorageError(f"{self.label}: {key!r} is not a key (relative path parts, no "
                               "'.', '..' or empty part)")
        return os.path.join(self.root, *parts)

    def _fail(self, action, key, exc):
        return StorageError(f"{self.label}: cannot {action} {key}: {exc.strerror or exc}")

    def check(self):
        if not os.path.isdir(self.root):
            raise StorageError(f"{self.label} does not exist; create it or fix the path")

    def _write(self, key, data, exclusive):
        path = self._path(key)
        try:
            try:
                write_file_hidden(path, bytes(data), exclusive=exclusive)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_file_hidden(path, bytes(data), exclusive=exclusive)
        except FileExistsError:
            raise
        except OSError as exc:
            raise self._fail('write', key, exc) from None

    def put(self, key, data):
        self._write(key, data, exclusive=False)

    def put_new(self, key, data):
        try:
            self._write(key, data, exclusive=True)
        except FileExistsError:
            return False
        return True

    def get(self, key):
        try:
            with open(self._path(key), 'rb') as handle:
                return handle.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError as exc:
            raise self._fail('read', key, exc) from None

    def head(self, key):
        data = self.get(key)
        if data is None:
            return None
        return {'size': len(data), 'etag': hashlib.md5(data).hexdigest(),
                'modified': os.stat(self._path(key)).st_mtime}

    def copy(self, source, key):
        data = self.get(source)
        if data is None:
            raise StorageError(f"{self.label}: cannot copy {source}: there is no such key")
        self.put(key, data)

    def objects(self, prefix=''):
        # walk only the folder the prefix ends in (all of root for '' or a prefix without '/')
        top = self._path(prefix.rsplit('/', 1)[0]) if '/' in prefix else self.root
        keys = []
        for folder, names, files in os.walk(top):
            names[:] = [n for n in names if not n.endswith('.tmp')]
            relative = os.path.relpath(folder, self.root)
            base = '' if relative == '.' else relative.replace(os.sep, '/') + '/'
            keys.extend(base + name for name in files
                        if not (name.startswith('.') and name.endswith('.tmp'))
                        and (base + name).startswith(prefix))
        for key in sorted(keys):
            found = self.head(key)
            if found is not None:           # deleted since the walk
                yield key, found['size'], found['etag'], found['modified']

    def folders(self, prefix):
        return sorted({key[len(prefix):].split('/', 1)[0] for key, _s, _e, _m
                       in self.objects(prefix) if '/' in key[len(prefix):]})

    def delete(self, keys):
        for key in list(keys):
            try:
                os.unlink(self._path(key))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise self._fail('delete', key, exc) from None
