"""vzdump's container archive (``vzdump-lxc-<vmid>-<time>.tar[.zst|.gz|.lzo]``), as Proxmox
VE writes and ``pct restore`` reads it: ``writer`` (a TreeCapture to an archive or a stream),
``reader`` (its configuration, a listing, a read-through check, a container restore with
pct restore's flags), ``pipes`` (tar, compressors, throttle), ``archives`` (what verify asks of
an archive on a directory storage). Names are storage/vzdump_names.py's (storage/ lists them).
"""
