"""Restore features over the block-export seam (``Format.open_block_exports``).

``live`` (restore with live: new images backed by the backup's exports, the guest started on
them, block-stream through guest/live.py), ``live_server`` (the process that serves a backup's
exports while a live restore copies them, and its supervisor), ``nbd_server`` (a read-only NBD
server over any exports, and ``ThreadServer``, which runs one in this process), ``file_restore``
(list or extract files through the appliance), ``appliance`` and ``appliance_init`` (the
throw-away VM and its PID 1), ``untrusted_tar`` (a tar stream into an empty directory). The
verbs are in run/ (restore.py, file_restore.py); plain restore is the format's ``restore_disk``
driven by run/restore.py. Nothing here talks QMP itself: guest/ does.
"""
