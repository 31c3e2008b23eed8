"""The ``lxc`` guest kind: LXC containers (Debian's ``lxc`` 5), as Proxmox VE's ``pct`` runs them.

- config: an LXC config file read into ``LxcConfig`` (rootfs, id map, mount entries, networks)
- pct_conf: the pct.conf a vzdump archive carries, written from an ``LxcConfig`` and read back,
  and an LXC config for a container restored from one
- container: ``Container``, the container as the lxc-* commands see it (state, stop, start,
  freeze, thaw)
- btrfs: the read-only snapshot of a btrfs subvolume rootfs (snapshot mode)
- modes: vzdump's stop, suspend and snapshot modes, each yielding the ``TreeCapture``
- leftovers: what a killed capture left (a frozen or stopped container, a temporary copy, a
  snapshot), found and cleared
"""
