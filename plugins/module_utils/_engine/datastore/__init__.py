"""Proxmox Backup Server's datastore format, byte for byte: the codecs a chunk store is built on.

``file_formats`` (magic numbers, header layouts), ``crypt`` (the key, keyed digests, AES-256-GCM),
``key_file`` (PBS key files), ``blob`` (DataBlob: chunks and small files), ``fixed_index``
(``.fidx``), ``chunk_store`` (``.chunks/``), ``manifest`` (``index.json.blob``). Nothing here
talks to QEMU or knows about runs; see docs/datastore-format.md for what matches PBS and what is
not there yet.
"""
