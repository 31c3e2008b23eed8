#!/usr/bin/env python
"""Issue 24's goals in one place: the last step of ``make bench``.

Reads what each bench left in DIR (the Makefile's ``$(BENCH_OUT)``): ``NAME.log``, its printed
output framed by the load averages before and after it, and ``NAME.json`` where the bench has
``--json``. For each goal it shows the verdict the measuring bench printed (MET/MISSED) and the
line it came from: the first verdict line of the goal's bench that matches the goal's pattern
below (a bench that words its line differently must be added there). Rows of a bench's JSON ``results``
(datastore_bench) are judged here against the issue's own limit, since a bench row may carry an
older, looser target. A goal with no verdict found says where to look. Measures nothing.
"""
from __future__ import annotations

import json
import os
import re
import sys

# (goal, what the issue asks, bench, pattern of its verdict line, the limit for a
# JSON row's ratio or None)
GOALS = (
    ('1', 'datastore full <= 1.15x the same-run floor with writes', 'datastore_bench',
     r'^(?!.*unchanged)(?=.*floor).*full', 1.15),
    ('2', 'unchanged second full <= 1.3x the read+sha256 floor', 'datastore_bench',
     r'unchanged.*(floor|sha256)', 1.3),
    ('2', 'encrypted full <= 1.1x the plain one', 'datastore_bench',
     r'^encrypted full', 1.1),
    ('3', 'qcow2 full <= 1.15x a bare QEMU copy (blockdev-backup, no hash; goal 6 too)',
     'backup_bench', r'blockdev-backup|bare', None),
    ('4', 'raw restore from a datastore <= 1.1x convert', 'restore_bench',
     r'raw, from a datastore', None),
    ('4', 'qcow2 chain restore (full + 6 incs) <= 1.2x qemu-img convert of the chain',
     'restore_bench', r'qcow2 chain', None),
    ('4', "live restore's background copy from a datastore <= 1.3x a plain restore",
     'live_restore_bench', r'copy.*(plain|restore)', None),
    ('5', 'S3 <= 1.3x the same objects by a plain uploader', 's3_bench',
     r'rclone|uploader|upload_file', None),
    ('6', 'peers in the table: borg 1.2 (lz4, zstd,1, encrypted), restic 0.14',
     'datastore_bench', r'goal 6', None),
    ('6', 'prune simulator < 1 s for 100k backups', 'prune_bench', r'simulate.*100k', None),
)
VERDICT = re.compile(r'\b(MET|MISSED)\b')
LOAD = re.compile(r'load average (before|after): (.*)')


def read(path):
    try:
        with open(path, encoding='utf-8', errors='replace') as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def verdict_lines(directory, bench):
    """(text, verdict, ratio or None) of every verdict a bench gave, JSON rows first."""
    found = []
    text = read(os.path.join(directory, f'{bench}.json'))
    for row in (json.loads(text).get('results') or []) if text else []:
        if row.get('verdict'):
            found.append((f"{row['what']}: {row.get('shown')} (target {row.get('target')})",
                          row['verdict'],
                          row.get('figure') if (row.get('shown') or '').endswith('x') else None))
    for line in (read(os.path.join(directory, f'{bench}.log')) or '').splitlines():
        match = VERDICT.search(line)
        if match and not line.startswith(' ' * 6):  # datastore_bench's rows: in its JSON
            found.append((line.strip(' |'), match.group(1), None))
    return found


def judge(goal, directory):
    """(verdict, evidence) of one goal."""
    _number, _what, bench, pattern, limit = goal
    if read(os.path.join(directory, f'{bench}.log')) is None:
        return 'NOT RUN', f'no {bench}.log in {directory}'
    own = re.compile(pattern, re.IGNORECASE)
    for text, verdict, ratio in verdict_lines(directory, bench):
        if own.search(text):
            if limit is not None and ratio is not None:
                verdict = 'MET' if ratio <= limit else 'MISSED'
                text += f"; the issue's limit {limit}x"
            return verdict, text
    return 'NO VERDICT', f'see the output of bench/{bench}.py'


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not os.path.isdir(args[0]):
        print("usage: summary.py DIR (the directory of the benches' NAME.log / NAME.json)",
              file=sys.stderr)
        return 2
    directory = args[0]
    print('\n' + '=' * 100)
    print('issue 24 (speed): every goal, as the benches of this run measured it')
    print('=' * 100)
    for goal in GOALS:
        verdict, evidence = judge(goal, directory)
        print(f"goal {goal[0]}: {goal[1]}\n    {verdict:10s} {evidence}")
    print('-' * 100)
    print('load averages (1/5/15 min) around each bench:')
    for bench in sorted({goal[2] for goal in GOALS}):
        loads = dict(LOAD.findall(read(os.path.join(directory, f'{bench}.log')) or ''))
        print(f"  {bench:20s} before {loads.get('before', '-')}, after {loads.get('after', '-')}")
    with open('/proc/loadavg') as handle:
        print(f"  now                  {' '.join(handle.read().split()[:3])}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
