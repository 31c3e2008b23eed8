"""Peers on the same data, in the same run (issue 24, goal 6): borg 1.2 with fixed 4 MiB chunks
(lz4, ``zstd,1``, and encrypted ``repokey-blake2`` with lz4) and restic 0.14, each timed for a
full into an empty repository, an unchanged second full and a restore of the bench disk's raw
image, every restore compared with ``cmp`` against the source.

Used by bench/datastore_bench.py: it exports the disk's point in time to a raw file (the bytes
guestvault backs up through QEMU) and calls ``PeerRun.round`` once per round, next to its own
full, unchanged full and raw restore, so each peer's ratio is taken against guestvault's figure
of the same round. The passphrases come from ``BORG_PASSPHRASE`` / ``RESTIC_PASSWORD`` when set,
else from ``secrets``; they are passed in the tools' environment only, never printed.
"""
from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import time

from backup_bench import fsync_file

STEPS = ('full', 'full2', 'restore')
COLUMNS = {'full': 'full', 'full2': 'unchanged full', 'restore': 'restore'}
# Same chunking as the datastore's (fixed 4 MiB); --sparse lets borg skip the holes as
# guestvault does; no files cache, so the unchanged full reads and hashes the image as
# guestvault's does (a VM disk's mtime says nothing about its blocks).
BORG_CREATE = ['--chunker-params', 'fixed,4194304', '--sparse', '--files-cache', 'disabled']


def borg_env(run):
    """borg's environment: its home under ``run``, a repokey passphrase, no questions."""
    return dict(os.environ, BORG_BASE_DIR=os.path.join(run, 'borg-home'),
                BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK='yes',
                BORG_PASSPHRASE=os.environ.get('BORG_PASSPHRASE') or secrets.token_hex(16))


def run_tool(argv, env, cwd=None):
    """Run a peer's command quietly; on failure, raise with what it printed."""
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-2000:]}")


def tool_version(argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True,
                              check=False).stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        return 'n/a'


class Borg:
    tool = 'borg'

    def __init__(self, name, encryption, compression):
        self.name, self.encryption, self.compression = name, encryption, compression

    def init(self, repo, env):
        run_tool(['borg', 'init', '-e', self.encryption, repo], env)

    def backup(self, repo, source, env, number):
        run_tool(['borg', 'create', '--compression', self.compression] + BORG_CREATE
                 + [f'{repo}::b{number}', os.path.basename(source)], env, os.path.dirname(source))

    def restore(self, repo, source, target, env):
        run_tool(['borg', 'extract', '--sparse', f'{repo}::b0'], env, target)
        return os.path.join(target, os.path.basename(source))


class Restic:
    """restic encrypts every repository (AES-256-CTR + Poly1305) and compresses with zstd
    (repository version 2, ``auto``); its chunker is content-defined, not configurable."""
    tool = 'restic'
    name = 'restic'

    def __init__(self, cache):
        self.cache = cache

    def _run(self, repo, argv, env, cwd=None):
        run_tool(['restic', '-r', repo, '--cache-dir', self.cache, '-q'] + argv, env, cwd)

    def init(self, repo, env):
        self._run(repo, ['init'], env)

    def backup(self, repo, source, env, number):
        # --force: the second full reads the file again rather than trusting its mtime
        self._run(repo, ['backup'] + (['--force'] if number else []) + [os.path.basename(source)],
                  env, os.path.dirname(source))

    def restore(self, repo, source, target, env):
        self._run(repo, ['restore', 'latest', '--target', target], env)
        return os.path.join(target, os.path.basename(source))


class PeerRun:
    """The peers found on PATH, run once per ``round`` on a raw export of ``image``."""

    def __init__(self, run, image, warm):
        self.run, self.warm = run, warm
        # the disk's bytes as guestvault reads them through QEMU; the guest writes nothing
        # between this export and the rounds, so it is the same point in time
        os.makedirs(os.path.join(run, 'peers'))
        self.source = os.path.join(run, 'peers', 'disk.raw')
        subprocess.run(['qemu-img', 'convert', '-U', '-O', 'raw', image, self.source],
                       check=True)
        self.size = os.stat(self.source).st_blocks * 512
        self.env = dict(borg_env(run), RESTIC_PASSWORD=os.environ.get('RESTIC_PASSWORD')
                        or secrets.token_hex(16))
        peers = [Borg('borg lz4', 'none', 'lz4'), Borg('borg zstd,1', 'none', 'zstd,1'),
                 Borg('borg encrypted', 'repokey-blake2', 'lz4'),
                 Restic(os.path.join(run, 'restic-cache'))]
        self.missing = sorted({p.tool for p in peers if shutil.which(p.tool) is None})
        self.peers = [p for p in peers if p.tool not in self.missing]
        self.versions = {tool: tool_version([tool, 'version' if tool == 'restic' else
                                             '--version']) for tool in ('borg', 'restic')
                         if tool not in self.missing}
        self.samples = {p.name: {step: [] for step in STEPS} for p in self.peers}

    def close(self):
        shutil.rmtree(os.path.join(self.run, 'peers'))

    def result(self):
        return {'versions': self.versions, 'missing': self.missing, 'times': self.samples}

    def round(self, rnd):
        """Each peer in turn (the order rotates by round): full into an empty repository,
        unchanged full, restore; each timed with its data durable (``sync -f`` of the
        repository's file system, the restored file fsynced), each restore then compared."""
        turn = rnd % max(1, len(self.peers))
        order = self.peers[turn:] + self.peers[:turn]
        for peer in order:
            repo = os.path.join(self.run, 'peer-repo')
            target = os.path.join(self.run, 'peer-restore')
            os.makedirs(target)
            peer.init(repo, self.env)
            times = self.samples[peer.name]
            for number, (step, warm_size) in enumerate((('full', self.size), ('full2', 0))):
                self.warm(warm_size)
                started = time.monotonic()
                peer.backup(repo, self.source, self.env, number)
                subprocess.run(['sync', '-f', repo], check=True)
                times[step].append(time.monotonic() - started)
            self.warm(self.size)
            started = time.monotonic()
            restored = peer.restore(repo, self.source, target, self.env)
            fsync_file(restored)
            times['restore'].append(time.monotonic() - started)
            if subprocess.run(['cmp', '--silent', self.source, restored],
                              check=False).returncode != 0:
                raise RuntimeError(f"{peer.name}'s restore differs from the source image "
                                   f"{self.source}")
            shutil.rmtree(repo)
            shutil.rmtree(target)
            print(f"  {peer.name}: " + ', '.join(f"{COLUMNS[s]} {times[s][-1]:.2f} s"
                                                 for s in STEPS) + ' (restore compared)',
                  flush=True)


def table(guestvault, peers):
    """The peers' table as lines: ``guestvault`` maps a row name ('guestvault datastore',
    'guestvault encrypted') to {step: [seconds per round]}; ``peers`` is ``PeerRun.result()``.
    A row's ratio is the median of its per-round ratios to a guestvault row of the same round:
    encrypted peers (restic always encrypts) against guestvault encrypted, the rest against
    guestvault datastore."""
    lines = ['| tool | ' + ' | '.join(COLUMNS[s] for s in STEPS) + ' |',
             '| --- |' + ' --- |' * len(STEPS)]
    rows = list(guestvault.items()) + list(peers['times'].items())
    for name, times in rows:
        encrypted = 'encrypted' in name or name == 'restic'
        reference = ('guestvault encrypted' if encrypted and not name.startswith('guestvault')
                     else 'guestvault datastore')
        cells = []
        for step in STEPS:
            mine, ref = times.get(step) or [], guestvault[reference].get(step) or []
            if not mine:
                cells.append('n/a')
                continue
            cell = f"{statistics.median(mine):.2f} s"
            if ref and len(ref) == len(mine) and name != reference:
                cell += f" ({statistics.median(a / b for a, b in zip(mine, ref)):.2f}x)"
            cells.append(cell)
        lines.append(f"| {name} | " + ' | '.join(cells) + ' |')
    lines.append("seconds: medians of the rounds; (Nx): median of the per-round ratios to "
                 "guestvault encrypted for borg encrypted and restic (always encrypted), to "
                 "guestvault datastore for the others")
    if peers['missing']:
        lines.append(f"not installed, not measured: {', '.join(peers['missing'])} "
                     "(make bench-deps)")
    return lines
