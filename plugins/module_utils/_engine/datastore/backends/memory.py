"""A ``Backend`` in a dict: the object store of the unit tests.

It keeps the contract of ``datastore/backend.py`` (atomic ``put_new``, MD5 etags, times on its
own clock) so the datastore code above it runs as on S3, without a cluster. ``clock`` can be
replaced to make objects old without waiting. Never used outside tests: nothing survives the
process.
"""
from __future__ import annotations

import hashlib
import threading
import time

from ...errors import StorageError


class MemoryBackend:
    def __init__(self, clock=time.time, label='memory backend'):
        self.clock = clock
        self.label = label
        self._objects = {}          # key -> (bytes, modified)
        self._lock = threading.Lock()

    def check(self):
        pass

    def put(self, key, data):
        with self._lock:
            self._objects[key] = (bytes(data), self.clock())

    def put_new(self, key, data):
        with self._lock:
            if key in self._objects:
                return False
            self._objects[key] = (bytes(data), self.clock())
            return True

    def get(self, key):
        with self._lock:
            found = self._objects.get(key)
        return None if found is None else found[0]

    def head(self, key):
        with self._lock:
            found = self._objects.get(key)
        if found is None:
            return None
        data, modified = found
        return {'size': len(data), 'etag': hashlib.md5(data).hexdigest(), 'modified': modified}

    def copy(self, source, key):
        data = self.get(source)
        if data is None:
            raise StorageError(f"{self.label}: cannot copy {source}: there is no such key")
        self.put(key, data)

    def objects(self, prefix=''):
        with self._lock:
            found = sorted((key, data, modified) for key, (data, modified)
                           in self._objects.items() if key.startswith(prefix))
        for key, data, modified in found:
            yield key, len(data), hashlib.md5(data).hexdigest(), modified

    def folders(self, prefix):
        with self._lock:
            keys = [key[len(prefix):] for key in self._objects if key.startswith(prefix)]
        return sorted({rest.split('/', 1)[0] for rest in keys if '/' in rest})

    def delete(self, keys):
        keys = list(keys)       # before the lock: a caller may pass a generator over objects()
        with self._lock:
            for key in keys:
                self._objects.pop(key, None)
