"""Chains of qcow2 backups and the dirty bitmaps that tie each chain to a guest.

A chain's bitmap on a disk is named ``guestvault.<chain>.<stamp>``, where ``stamp`` is the time of
the backup the bitmap counts changes since. Each incremental backup adds the next bitmap and drops
the previous one only once the new backup is safely on storage, so:

- a failed or killed backup leaves the previous bitmap intact: nothing is lost;
- a bitmap always says which backup it belongs to, so an incremental is taken only when the
  newest backup of the chain on *this* storage is exactly the one the bitmap counts from (a backup
  that was removed, or taken to another storage, shows up as a name mismatch, never as silent
  corruption).

The level decision is a pure function of what the storage and the guest report, so it can be
tested on plain data and shown in check mode.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ..errors import ChainError, ConfigError
from ..times import format_time, parse_time
from ..vocabulary import CHAIN_PERIODS, LEVELS

BITMAP_PREFIX = 'guestvault'
_NAMED_CHAIN = re.compile(r'[A-Za-z][A-Za-z0-9_-]{0,63}')
_STAMP = '%Y%m%dT%H%M%SZ'


def validate_chain_name(name):
    """Named chains start with a letter; generated ones are a time stamp, so they never clash."""
    if not _NAMED_CHAIN.fullmatch(name or ''):
        raise ConfigError(
            f"chain {name!r} is not a valid chain name: use 1-64 letters, digits, '-' or '_', "
            "starting with a letter (e.g. 'nightly')")
    return name


def stamp(when):
    return when.astimezone(timezone.utc).strftime(_STAMP)


def bitmap_name(chain, since):
    return f"{BITMAP_PREFIX}.{chain}.{stamp(since)}"


def parse_bitmap_name(name):
    """(chain, stamp) of one of our bitmaps, or None for anybody else's."""
    parts = name.split('.')
    if len(parts) != 3 or parts[0] != BITMAP_PREFIX:
        return None
    return parts[1], parts[2]


def is_generated_chain(chain):
    return bool(chain) and chain[0].isdigit()


@dataclass
class ChainTip:
    """The newest backup of a chain on the storage, as the level decision needs it."""
    backup_time: datetime
    chain: str
    chain_start: datetime
    disk_ids: tuple
    key_fingerprint: str = None    # the key it was encrypted with (colon hex), None without one


@dataclass
class LevelDecision:
    level: str                 # full, inc or copy: what will be taken
    chain: str = None          # chain the backup belongs to (None for copy)
    parent: datetime = None    # inc: the backup it builds on
    reason: str = ''           # why this level (always set for a fallback)
    fallback: bool = False
    warnings: list = field(default_factory=list)

    def as_dict(self):
        return {'level': self.level, 'chain': self.chain, 'reason': self.reason,
                'parent': format_time(self.parent) if self.parent else None}


def chain_tip(backups, chain_name=None):
    """The newest backup of the chain to continue: of the named chain, else of the newest chain.

    ``backups`` are a guest's backups on one storage, oldest first; copies (no chain) never
    start or continue one. Returns None when there is no chain to continue.
    """
    in_chains = [b for b in backups
                 if b.manifest.chain and b.manifest.level in ('full', 'inc')]
    if chain_name:
        in_chains = [b for b in in_chains if b.manifest.chain == chain_name]
    if not in_chains:
        return None
    tip = in_chains[-1]
    return ChainTip(backup_time=tip.time, chain=tip.manifest.chain,
                    chain_start=parse_time(tip.manifest.chain_start),
                    disk_ids=tuple(d.id for d in tip.manifest.disks if d.bitmap),
                    key_fingerprint=tip.manifest.key_fingerprint)


def chain_problem(tip, disks, chain_period, now):
    """Why the chain cannot be continued by a backup of ``disks``, or None if it can.

    The one rule behind both ``guest_backup``'s level decision and ``guest_info``'s
    ``can_continue``. ``disks`` are the disks a backup would take.
    """
    chain_disks = [d for d in disks if d.supports_bitmaps]
    if not chain_disks:
        return "none of the selected disks can hold a dirty bitmap (qcow2 v3 needed)"
    if tip is None:
        return "no earlier backup of this chain on this storage"
    if chain_period == 'monthly' and (tip.chain_start.year, tip.chain_start.month) != (
            now.year, now.month):
        return (f"chain_period is monthly and chain {tip.chain} began in "
                f"{tip.chain_start:%Y-%m}; a new month starts a new chain")
    if tuple(sorted(d.id for d in chain_disks)) != tuple(sorted(tip.disk_ids)):
        return (f"the selected disks ({', '.join(sorted(d.id for d in chain_disks))}) differ "
                f"from those of the previous backup ({', '.join(sorted(tip.disk_ids))})")
    wanted = bitmap_name(tip.chain, tip.backup_time)
    for disk in chain_disks:
        names = {b['name']: b for b in disk.bitmaps}
        bitmap = names.get(wanted)
        if bitmap is None:
            ours = [n for n in names if (parse_bitmap_name(n) or ('',))[0] == tip.chain]
            if ours:
                since = datetime.strptime(parse_bitmap_name(ours[0])[1], _STAMP)
                return (f"disk {disk.id} has bitmap {ours[0]}, which counts changes since the "
                        f"backup of {since:%Y-%m-%dT%H:%M:%SZ}, but the newest backup of chain "
                        f"{tip.chain} on this storage is {format_time(tip.backup_time)}; "
                        "that later backup was removed, or the chain went on on another storage")
            return (f"disk {disk.id} has no bitmap {wanted}: QEMU was restarted from an image "
                    "without it, or it was removed")
        if bitmap.get('inconsistent'):
            return (f"bitmap {wanted} on disk {disk.id} is inconsistent: QEMU stopped without "
                    "saving it (crash or kill during a run)")
    return None


def check_level_options(requested, chain_name=None, chain_period='none'):
    """The level options on their own: checked before anything is locked or changed."""
    if requested not in LEVELS:
        raise ConfigError(f"level {requested!r} is not one of {', '.join(LEVELS)}")
    if chain_period not in CHAIN_PERIODS:
        raise ConfigError(f"chain_period {chain_period!r} is not one of {', '.join(CHAIN_PERIODS)}")
    if chain_period != 'none' and requested != 'auto':
        raise ConfigError(f"chain_period {chain_period} decides between full and incremental "
                          "backups, so it needs level auto")
    if chain_name:
        validate_chain_name(chain_name)


def check_container_level(vmid, requested, chain_name=None):
    """A container's backup is a vzdump archive: always full and in no chain. ``inc`` and a
    named chain are refused; ``auto``, ``full`` and ``copy`` all take a full archive."""
    if requested == 'inc' or chain_name:
        what = 'level inc' if requested == 'inc' else f"chain {chain_name}"
        raise ConfigError(f"guest {vmid} is a container, whose backups are vzdump archives: "
                          f"always full and in no chain, so {what} cannot apply to it; give "
                          "level auto or full and no chain for it")


def _key_name(fingerprint):
    """A key as messages name it: its short fingerprint (the first 8 bytes), as PBS does."""
    return f"key {fingerprint[:23]}" if fingerprint else "no key"


def key_change(tip, key_fingerprint):
    """Why the chain cannot go on with the key new backups use (``key_fingerprint``, None for
    none), or None when the tip was made with the same key (or without one, as is this one)."""
    if tip is None or tip.key_fingerprint == key_fingerprint:
        return None
    return (f"the encryption key changed: backup {format_time(tip.backup_time)} of chain "
            f"{tip.chain} was made with {_key_name(tip.key_fingerprint)}, this backup uses "
            f"{_key_name(key_fingerprint)}, and its chunks cannot be reused under another key")


def decide_level(requested, now, disks, tip, chain_name=None, chain_period='none',
                 key_fingerprint=None):
    """Choose the level of the next backup.

    ``disks`` are the selected disks (with their current bitmaps); ``tip`` the newest backup of the
    chain to continue (``None`` when there is none); ``key_fingerprint`` the key the backup is
    encrypted with (None without one). ``level: inc`` raises ChainError where ``auto`` falls
    back to a full backup and says why. Another key than the tip's starts a new chain with a
    full backup at ``auto`` and ``inc`` alike, with a warning, as PBS's client does.
    """
    check_level_options(requested, chain_name, chain_period)
    if requested == 'copy':
        return LevelDecision('copy', reason='copy requested: a full backup outside any chain')
    new_chain = chain_name or stamp(now)
    if requested == 'full':
        return LevelDecision('full', chain=new_chain, reason='full requested')
    changed_key = key_change(tip, key_fingerprint)
    if changed_key is not None:
        return LevelDecision('full', chain=new_chain, reason=f"{requested}: full because "
                             f"{changed_key}", fallback=True,
                             warnings=[f"{changed_key}; this backup is a full one, starting "
                                       f"chain {new_chain}"])
    problem = chain_problem(tip, disks, chain_period, now)
    if problem is None:
        return LevelDecision('inc', chain=tip.chain, parent=tip.backup_time,
                             reason=f"continues chain {tip.chain}")
    if requested == 'inc':
        raise ChainError(f"cannot take an incremental backup: {problem}. Take a full backup "
                         "(level: full), or use level: auto to fall back to one by itself")
    return LevelDecision('full', chain=new_chain, reason=f"auto: full because {problem}",
                         fallback=True)


def bitmaps_to_retire(disks, decision, backup_time):
    """Our bitmaps that stop being useful once the new backup is safely stored.

    After a full backup: every bitmap of the same named chain, or, for a generated chain, of any
    generated chain (one unnamed chain is kept alive at a time; named chains coexist). After an
    incremental: every other bitmap of the chain (the parent's, and leftovers of killed runs).
    """
    keep = bitmap_name(decision.chain, backup_time)
    retire = []
    for disk in disks:
        for bitmap in disk.bitmaps:
            parsed = parse_bitmap_name(bitmap['name'])
            if parsed is None or bitmap['name'] == keep:
                continue
            chain = parsed[0]
            same = chain == decision.chain or (
                decision.level == 'full' and is_generated_chain(chain)
                and is_generated_chain(decision.chain))
            if same:
                retire.append((disk.node, bitmap['name']))
    return retire


def orphan_bitmaps(disks, backups, interrupted_bitmaps=()):
    """Our bitmaps that no stored backup and no live chain needs: [(disk, bitmap name, why)].

    ``backups`` are the guest's backups on the storage at hand; ``interrupted_bitmaps`` the
    (node, name) pairs a killed run added before its backup was stored. A bitmap is an orphan
    when that killed run added it, when it is inconsistent (it can never continue a chain), or
    when its chain has a newer backup on this storage than the one it counts from (superseded:
    the chain's own bitmap is the newer one). A chain with no backups on this storage may live
    on another storage, so its bitmaps are left alone.
    """
    interrupted = {tuple(pair) for pair in interrupted_bitmaps}
    tips = {}
    orphans = []
    for disk in disks:
        for bitmap in disk.bitmaps:
            parsed = parse_bitmap_name(bitmap['name'])
            if parsed is None:
                continue
            chain, since = parsed
            if (disk.node, bitmap['name']) in interrupted:
                why = "added by a run that was killed before its backup was stored"
            elif bitmap.get('inconsistent'):
                why = "inconsistent (QEMU stopped without saving it): it can never continue a chain"
            else:
                if chain not in tips:
                    tips[chain] = chain_tip(backups, chain)
                tip = tips[chain]
                if tip is None or since == stamp(tip.backup_time):
                    continue
                why = (f"superseded: the newest backup of chain {chain} on this storage is "
                       f"{format_time(tip.backup_time)}, which has its own bitmap")
            orphans.append((disk, bitmap['name'], why))
    return orphans


def expected_bytes(decision, disks):
    """About how many bytes a backup writes: the disks' allocated size for a full, the dirty
    bytes of the bitmap an incremental copies from (raw disks are always whole)."""
    total = 0
    for disk in disks:
        since = bitmap_name(decision.chain, decision.parent) \
            if decision.level == 'inc' and disk.supports_bitmaps else None
        dirty = next((b.get('count', 0) for b in disk.bitmaps if b['name'] == since), None)
        total += dirty if dirty is not None else disk.allocated
    return total
