"""Proxmox Backup Server's datastore, as pbs-datastore keeps it: everything of it in one package.

Codecs, byte for byte as PBS: ``file_formats`` (magic numbers, header layouts), ``crypt`` (the
key, keyed digests, AES-256-GCM), ``key_file`` (PBS key files), ``blob`` (DataBlob: chunks and
small files), ``fixed_index`` (``.fidx``), ``dynamic_index`` (``.didx``), ``index`` (the ``Index`` protocol
both implement, and ``read_index`` by magic), ``manifest``
(``index.json.blob``), ``snapshot`` (a snapshot's manifest and blobs). Chunk stores:
``chunk_store`` (``.chunks/`` in a directory) and ``object_chunks`` (chunks as objects of a
``backend.Backend``: ``backends/s3``, ``backends/local``, ``backends/memory``); ``gc``, the one
garbage collector. Pipelines: ``sources``, ``workers``, ``backup_writer``, ``image_restore``,
``verify``, ``snapshot_export`` (a snapshot's disks as block exports for the NBD server of
restore/). The storage (``storage``: one ``DatastoreStorage`` with a
``SnapshotMirror``: a no-op on a file system, ``object_mirror`` on a Backend), the writer
registry (``writers``: flock files, or leases on a Backend), the Datastore Format
(``format``), and ``build``, which puts them together. Nothing here talks to QEMU over QMP or
knows about runs; see docs/datastore-format.md for what matches PBS and what is not there yet.
"""
