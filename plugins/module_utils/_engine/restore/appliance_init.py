"""The file-restore appliance's init (PID 1), a busybox shell script kept as a string: Ansible
ships only Python files of module_utils.

It does one request and powers off. The request comes over fw_cfg
(``opt/guestvault/request``), one ``key value`` per line::

    op probe|list|measure|extract
    filesystem NAME          (empty: the only one there is)
    disks N                  (how many backup disks to wait for)
    max_bytes N              (measure/extract: the most file bytes to extract)
    path REL                 (repeated; relative to the filesystem's root, '' is the root)

Disks are found by their virtio serial: ``gvdisk-<disk id>`` (the backup, behind a throw-away
overlay, so journals can be replayed), ``gvout`` (the payload: a listing or a tar stream) and
``gvstatus`` (this status, NUL-padded)::

    fs NAME TYPE SIZE UUID LABEL     one per block device found ('-' for unknown)
    chosen NAME TYPE
    warning TEXT
    result list NAMES_BYTES META_BYTES LINKS_BYTES
    result measure FILES BYTES ENTRIES
    result extract FILES BYTES ENTRIES
    error KIND TEXT                  kinds: request, no-filesystem, ambiguous,
                                     unknown-filesystem, mount, not-found, size-limit,
                                     write (the listing), tar (TEXT: tar's own error output)
    end

A listing is three parts one after the other in the payload: the entries' names (each
NUL-terminated, as ``find -print0`` gives them), one ``MODE SIZE MTIME UID GID`` line per entry
in the same order (``stat``: MODE in hex), and ``NAME\\0TARGET\\0`` of each symbolic link.
Paths are looked up inside the guest's filesystem: a symbolic link on the way is followed
within it (an absolute one from its root), never into the appliance's own files.
"""

INIT = r'''#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp /mnt/fs
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/lock/lvm /run/lvm /run/blkid
# Filesystems other than ext4 are loaded when one is mounted: xfs alone takes ~1 s under TCG.
: > /tmp/deferred
while read -r module; do
    case "$module" in
        libcrc32c.ko|xfs.ko|fat.ko|vfat.ko|nls_*) echo "$module" >> /tmp/deferred ;;
        *) insmod "/lib/modules/$module" 2>/dev/null ;;
    esac
done < /etc/guestvault/modules
load_deferred() {
    # load_deferred PATTERN...: the deferred modules that match, in their dependency order
    while read -r module; do
        for pattern in "$@"; do
            case "$module" in $pattern) insmod "/lib/modules/$module" 2>/dev/null ;; esac
        done
    done < /tmp/deferred
}
echo GUESTVAULT-APPLIANCE-UP

STATUS=
: > /tmp/status
say() { printf '%s\n' "$*" >> /tmp/status; }
finish() {
    say end
    umount /mnt/fs 2>/dev/null
    if [ -n "$STATUS" ]; then
        dd if=/tmp/status of="$STATUS" bs=4096 conv=fsync 2>/dev/null
    fi
    sync
    poweroff -f
}
fail() { kind=$1; shift; say "error $kind $*"; finish; }
said() {
    # said FILE: a program's error output as one status line: its first lines, each cut to
    # 400 characters (a name can be 4096 long), and how many more there were
    awk 'NR <= 3 { if (length($0) > 400) $0 = substr($0, 1, 200) " ... " substr($0, length($0) - 150)
                   printf "%s%s", (NR > 1 ? "; " : ""), $0 }
         END { if (NR > 3) printf "; and %d more line(s)", NR - 3 }' "$1"
}

wait_for() {
    # wait_for TEST... : up to 10 s, the kernel probes devices asynchronously
    n=0
    until "$@"; do
        [ $n -ge 100 ] && return 1
        usleep 100000
        n=$((n + 1))
    done
}

REQUEST=/sys/firmware/qemu_fw_cfg/by_name/opt/guestvault/request/raw
wait_for test -e "$REQUEST" || { echo "GUESTVAULT-APPLIANCE-NO-REQUEST"; poweroff -f; }
OP= FS= DISKS=0 MAX_BYTES=0
: > /tmp/paths
while IFS= read -r line; do
    case "$line" in
        "op "*) OP=${line#op } ;;
        "filesystem "*) FS=${line#filesystem } ;;
        "disks "*) DISKS=${line#disks } ;;
        "max_bytes "*) MAX_BYTES=${line#max_bytes } ;;
        "path "*) printf '%s\n' "${line#path }" >> /tmp/paths ;;
    esac
done < "$REQUEST"

count_disks() { set -- /sys/block/vd*; [ -e "$1" ] && [ $# -ge $((DISKS + 2)) ]; }
wait_for count_disks
: > /tmp/disks
for block in /sys/block/vd*; do
    [ -e "$block" ] || continue
    serial=$(cat "$block/serial" 2>/dev/null)
    case "$serial" in
        gvout) OUT=/dev/${block##*/} ;;
        gvstatus) STATUS=/dev/${block##*/} ;;
        gvdisk-*) echo "${serial#gvdisk-} ${block##*/}" >> /tmp/disks ;;
    esac
done
[ -n "$STATUS" ] && [ -n "$OUT" ] || { echo "GUESTVAULT-APPLIANCE-NO-OUTPUT"; poweroff -f; }
[ -n "$OP" ] || fail request "no op in the request"

# Block devices: each disk, its partitions, then logical volumes once LVM has activated them.
: > /tmp/candidates
while read -r id name; do
    echo "$id /dev/$name" >> /tmp/candidates
    for part in /sys/block/"$name"/"$name"*; do
        [ -e "$part/partition" ] || continue
        echo "$id/part$(cat "$part/partition") /dev/${part##*/}" >> /tmp/candidates
    done
done < /tmp/disks
LVMCONF='devices { obtain_device_list_from_udev = 0 } activation { udev_sync = 0 udev_rules = 0 monitoring = 0 } global { locking_dir = "/run/lock/lvm" }'
if lvm pvs --config "$LVMCONF" --noheadings -o pv_name > /tmp/pvs 2>/tmp/lvm.log && [ -s /tmp/pvs ]; then
    lvm vgchange -ay --config "$LVMCONF" >> /tmp/lvm.log 2>&1 || say "warning LVM could not activate every volume group: $(tail -n 1 /tmp/lvm.log)"
    lvm lvs --config "$LVMCONF" --noheadings --separator '|' -o vg_name,lv_name,lv_dm_path 2>>/tmp/lvm.log |
    while IFS='|' read -r vg lv path; do
        vg=$(echo $vg)
        [ -b "$path" ] && echo "lvm/$vg/$lv $path" >> /tmp/candidates
    done
fi

tag() { blkid -c /dev/null -s "$1" -o value "$2" 2>/dev/null | head -n 1 | tr -d '\r' | head -c 200; }
: > /tmp/found
while read -r name dev; do
    # values, never eval'd: a label is the guest's to choose
    TYPE=$(tag TYPE "$dev") UUID=$(tag UUID "$dev") LABEL=$(tag LABEL "$dev")
    size=$(blockdev --getsize64 "$dev" 2>/dev/null || echo 0)
    # an extended partition's container is 1 KiB: nothing to read there
    [ -z "$TYPE" ] && [ "$size" -le 1024 ] && continue
    # a disk that only holds a partition table: its partitions are listed instead
    [ -z "$TYPE" ] && [ -n "$(tag PTTYPE "$dev")" ] && continue
    say "fs $name ${TYPE:--} $size ${UUID:--} $LABEL"
    echo "$name $dev ${TYPE:--}" >> /tmp/found
done < /tmp/candidates
[ "$OP" = probe ] && { say "result probe"; finish; }

mountable() { case "$1" in ext2|ext3|ext4|xfs|vfat) return 0 ;; esac; return 1; }
CHOSEN=
if [ -n "$FS" ]; then
    while read -r name dev type; do
        [ "$name" = "$FS" ] && CHOSEN="$name $dev $type"
    done < /tmp/found
    [ -n "$CHOSEN" ] || fail no-filesystem "$FS"
else
    n=0
    while read -r name dev type; do
        mountable "$type" && { CHOSEN="$name $dev $type"; n=$((n + 1)); }
    done < /tmp/found
    [ $n -eq 0 ] && fail unknown-filesystem "no ext2/3/4, xfs or vfat filesystem found"
    [ $n -gt 1 ] && fail ambiguous "$n filesystems found"
fi
set -- $CHOSEN
NAME=$1 DEV=$2 TYPE=$3
say "chosen $NAME $TYPE"
case "$TYPE" in
    ext2|ext3|ext4) MTYPE=ext4 NOREPLAY=noload OPTS=ro ;;
    xfs) MTYPE=xfs NOREPLAY=norecovery OPTS=ro; load_deferred libcrc32c.ko xfs.ko ;;
    # names as UTF-8, not the kernel's default ascii (which mangles the rest)
    vfat) MTYPE=vfat NOREPLAY= OPTS=ro,iocharset=utf8; load_deferred fat.ko vfat.ko 'nls_*' ;;
    *) fail unknown-filesystem "$NAME holds $TYPE, which the appliance cannot read (ext2/3/4, xfs, vfat)" ;;
esac
# Read-only, but the device is writable (an overlay): a journal is replayed into the overlay.
if ! mount -t "$MTYPE" -o "$OPTS" "$DEV" /mnt/fs 2>/tmp/mount.err; then
    if [ -n "$NOREPLAY" ] && mount -t "$MTYPE" -o "$OPTS,$NOREPLAY" "$DEV" /mnt/fs 2>>/tmp/mount.err; then
        say "warning $NAME was mounted without replaying its journal: files written just before the backup may be missing"
    else
        fail mount "$NAME ($TYPE): $(tail -n 1 /tmp/mount.err)"
    fi
fi

resolve() {
    # resolve REL FOLLOW_LAST: the path under /mnt/fs that REL names inside the guest's
    # filesystem; links on the way are followed within it (an absolute one from its root)
    rest=$1 cur= hops=0
    while [ -n "$rest" ]; do
        comp=${rest%%/*}
        if [ "$comp" = "$rest" ]; then rest=; else rest=${rest#*/}; fi
        case "$comp" in
            ''|.) continue ;;
            ..) cur=${cur%/*}; continue ;;
        esac
        next="$cur/$comp"
        if [ -L "/mnt/fs$next" ] && { [ -n "$rest" ] || [ "$2" = 1 ]; }; then
            hops=$((hops + 1))
            [ $hops -gt 40 ] && return 1
            link=$(readlink "/mnt/fs$next")
            case "$link" in /*) cur= ;; esac
            rest="$link${rest:+/$rest}"
        else
            cur=$next
        fi
    done
    printf '%s\n' "$cur"
}

exists() { [ -e "/mnt/fs$1" ] || [ -L "/mnt/fs$1" ]; }

if [ "$OP" = list ]; then
    IFS= read -r rel < /tmp/paths
    path=$(resolve "$rel" 1) && exists "$path" || fail not-found "/$rel"
    if [ -d "/mnt/fs$path" ]; then
        cd "/mnt/fs$path" && set -- . -mindepth 1 -maxdepth 1
    else
        cd "/mnt/fs${path%/*}" && set -- "./${path##*/}" -maxdepth 0
    fi
    find "$@" -print0 > /tmp/names
    find "$@" -exec stat -c '%f %s %Y %u %g' {} + > /tmp/meta
    find "$@" -type l -exec sh -c 'for f; do printf "%s\0%s\0" "$f" "$(readlink "$f")"; done' sh {} + > /tmp/links
    cat /tmp/names /tmp/meta /tmp/links > /tmp/payload
    dd if=/tmp/payload of="$OUT" bs=65536 conv=fsync 2>/tmp/dd.err || fail write "the listing could not be written: $(said /tmp/dd.err)"
    say "result list $(wc -c < /tmp/names) $(wc -c < /tmp/meta) $(wc -c < /tmp/links)"
    finish
fi

# measure / extract: every path must exist; the files' bytes must fit max_bytes.
cd /mnt/fs
set --
while IFS= read -r rel; do
    path=$(resolve "$rel" 0) && exists "$path" || fail not-found "/$rel"
    set -- "$@" ".$path"
done < /tmp/paths
[ $# -gt 0 ] || fail request "no path to extract"
totals=$(find "$@" -type f -exec stat -c %s {} + | awk '{ s += $1; n++ } END { printf "%d %.0f", n, s }')
entries=$(find "$@" | wc -l)
FILES=${totals% *} BYTES=${totals#* }
if [ "$BYTES" -gt "$MAX_BYTES" ]; then
    fail size-limit "$FILES files, $BYTES bytes"
fi
if [ "$OP" = measure ]; then
    say "result measure $FILES $BYTES $entries"
    finish
fi
# Straight onto the disk: through a pipe (tar | tee | wc) it was 7x slower under TCG. The
# host finds the stream's end by reading its headers.
# tar's own words go back (its last line alone is "error exit delayed from previous errors").
tar -c -f "$OUT" "$@" 2>/tmp/tar.err || fail tar "$(said /tmp/tar.err)"
sync
say "result extract $FILES $BYTES $entries"
finish
'''
