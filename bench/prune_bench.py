#!/usr/bin/env python
"""Prune simulator benchmark: 100k backups through the retention selection, against yardsticks run
in the same process.

A benchmark, not a test: it prints seconds and ratios and never asserts a time (the target, the
simulator under 1 s for 100k backups, is printed as MET/MISSED). It exits non-zero only when
something fails: the baseline's results differ from the current code's, or a run raises.

What one run does (see bench/README.md):

1. builds --count backups (default 100k), one every 5-10 minutes from 2023-01-01 UTC (about
   1.4 years, so every rule of the policy has periods to walk, across DST changes and a year
   end), 1 in 200 protected, in shuffled order (the selection sorts them; so does the yardstick);
2. in each of --repeat rounds, for three inputs (the prune module's ``simulate`` list with epoch
   times and ids, the same with ISO 8601 times and no ids, and ``select_for_prune`` with aware
   datetimes as the prune run passes them), times the current code and the baseline (by default
   the last commit before the simulator was optimized, loaded from ``git show``) one after the
   other, alternating which goes first; plus a plain ``sorted()`` of the same epoch times;
3. checks the baseline and the current code give the same marks for every input, then prints
   medians (min-max), the ratios and the load average at start and end.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import random
import statistics
import subprocess
import sys
import time
import types
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RETENTION = 'plugins/module_utils/_engine/policy/retention.py'
# The last commit whose selection walked every backup through typing.Mapping checks, eager period
# keys and one object per backup: the "before" of the simulator's optimization.
BASELINE = 'eebe3263b062ce855e972a1169721d04de9bdaa2'
POLICY = 'keep-last=3,keep-hourly=24,keep-daily=7,keep-weekly=4,keep-monthly=12,keep-yearly=5'
TARGET_SECONDS = 1.0  # for the simulator with --count 100000
SORTED = 'sorted() of the epoch times'
SHORT = {'simulate, epoch times, ids': 'epoch', 'simulate, ISO times, no ids': 'iso',
         'select_for_prune, datetimes': 'select'}


# --------------------------------------------------------------------------------------- set-up
def load_engine():
    """The engine as package ``guestvault_engine`` (tools/engine_loader.py, as the tests do)."""
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
    from engine_loader import load_engine as load
    load()
    from guestvault_engine.policy import retention
    return retention


def load_baseline(rev):
    """retention.py as of ``rev``, as a sibling module (it imports the current config/times)."""
    source = subprocess.run(['git', '-C', ROOT, 'show', f'{rev}:{RETENTION}'],
                            capture_output=True, text=True, check=True).stdout
    name = 'guestvault_engine.policy._retention_baseline'
    module = types.ModuleType(name)
    module.__package__ = 'guestvault_engine.policy'
    module.__file__ = f'{rev[:12]}:{RETENTION}'
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    exec(compile(source, module.__file__, 'exec'), module.__dict__)
    return module


def make_times(count, seed):
    """Epoch seconds, one every 5-10 minutes from 2023-01-01 UTC, and which are protected."""
    rng = random.Random(seed)
    moment = int(datetime(2023, 1, 1, tzinfo=timezone.utc).timestamp())
    times, protected = [], []
    for index in range(count):
        moment += rng.randint(300, 600)
        times.append(moment)
        protected.append(rng.random() < 0.005)
    order = list(range(count))
    rng.shuffle(order)
    return [times[i] for i in order], [protected[i] for i in order]


def make_inputs(times, protected):
    def utc_name(t):
        return datetime.fromtimestamp(t, timezone.utc).isoformat().replace('+00:00', 'Z')
    return {
        'simulate, epoch times, ids': [
            {'id': f'vm100-{t}', 'time': t, 'protected': p} for t, p in zip(times, protected)],
        'simulate, ISO times, no ids': [
            {'time': utc_name(t), 'protected': p} for t, p in zip(times, protected)],
        'select_for_prune, datetimes': [
            {'id': utc_name(t), 'time': datetime.fromtimestamp(t, timezone.utc), 'protected': p}
            for t, p in zip(times, protected)],
    }


def runner(module, case, tz):
    """A call running ``case`` on ``module``, and one turning its result into comparable data."""
    if case.startswith('simulate'):
        return (lambda data: module.simulate(data, POLICY, tz)), (lambda result: result)
    policy = module.RetentionPolicy.parse(POLICY)
    return ((lambda data: module.select_for_prune(data, policy, tz)),
            (lambda result: [(m.id, m.time, m.mark, m.rule) for m in result]))


def timed(call, *args):
    """(wall seconds, CPU seconds of this process, result): on a shared machine the CPU time
    shows how much of the wall time was the call's own."""
    started, cpu = time.perf_counter(), time.process_time()
    result = call(*args)
    return time.perf_counter() - started, time.process_time() - cpu, result


def say(message):
    print(message, flush=True)


def loadavg():
    with open('/proc/loadavg') as handle:
        return ' '.join(handle.read().split()[:3])


def med(samples):
    return statistics.median(samples)


def spread(samples):
    return f"{min(samples):.3f}-{max(samples):.3f}"


def profile(module, case, data, tz, lines=15):
    call = runner(module, case, tz)[0]
    profiler = cProfile.Profile()
    profiler.runcall(call, data)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats('tottime').print_stats(lines)
    return out.getvalue()


# ---------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
    parser.add_argument('--count', type=int, default=100_000)
    parser.add_argument('--repeat', type=int, default=5)
    parser.add_argument('--timezone', default='Europe/Berlin')
    parser.add_argument('--seed', type=int, default=9)
    parser.add_argument('--baseline', default=BASELINE,
                        help="git revision of retention.py to compare with (default: before the "
                             "optimization); 'none' to skip")
    parser.add_argument('--profile', action='store_true',
                        help='also print a cProfile of the current simulator (first input)')
    parser.add_argument('--json', help='also write the raw samples to this file')
    args = parser.parse_args(argv)

    current = load_engine()
    baseline, baseline_note = None, 'none'
    if args.baseline != 'none':
        try:
            baseline = load_baseline(args.baseline)
            baseline_note = f"retention.py at {args.baseline[:12]} (git show)"
        except (OSError, subprocess.CalledProcessError) as error:
            baseline_note = f"not loaded ({error}); ratios to it are skipped"
    times, protected = make_times(args.count, args.seed)
    inputs = make_inputs(times, protected)
    load_start = loadavg()
    say(f"{args.count} backups, policy {POLICY}, time zone {args.timezone}; "
        f"baseline {baseline_note}")

    samples = {case: {'current': [], 'current_cpu': [], 'baseline': []} for case in inputs}
    samples[SORTED] = {'current': [], 'current_cpu': []}
    failures = []
    for round_no in range(args.repeat):
        figures = []
        for case, data in inputs.items():
            sides = [('current', current)] + ([('baseline', baseline)] if baseline else [])
            if round_no % 2:
                sides.reverse()
            results = {}
            for side, module in sides:
                call, comparable = runner(module, case, args.timezone)
                seconds, cpu, result = timed(call, data)
                samples[case][side].append(seconds)
                if side == 'current':
                    samples[case]['current_cpu'].append(cpu)
                if round_no == 0:
                    results[side] = comparable(result)
                del result
            if round_no == 0 and baseline and results['current'] != results['baseline']:
                failures.append(f"{case}: the current code's marks differ from the baseline's")
            figures.append(f"{SHORT[case]} {samples[case]['current'][-1]:.2f}"
                           + (f"/{samples[case]['baseline'][-1]:.2f}" if baseline else ''))
        seconds, cpu = timed(sorted, times)[:2]
        samples[SORTED]['current'].append(seconds)
        samples[SORTED]['current_cpu'].append(cpu)
        pair = 'current/baseline' if baseline else 'current'
        say(f"  round {round_no + 1}/{args.repeat}: seconds ({pair}) {'; '.join(figures)}; "
            f"sorted() {seconds:.3f}")
    load_end = loadavg()

    line = '-' * 100
    say('\n' + '=' * 100)
    say(f"guestvault prune benchmark — medians of {args.repeat} runs (min-max)")
    say('=' * 100)
    for key, value in (('nproc', os.cpu_count()), ('python', platform.python_version()),
                       ('load', f"{load_start} at start, {load_end} at end"),
                       ('baseline', baseline_note)):
        say(f"  {key:9s} {value}")
    say(line)
    sort_s = med(samples[SORTED]['current'])
    say(f"{'input':30s} {'current':>8s} {'range':>12s} {'cpu':>6s} {'baseline':>9s} "
        f"{'range':>12s} {'speed-up':>9s} {'/ sorted()':>10s}")
    say(line)
    for case in inputs:
        now, before = samples[case]['current'], samples[case]['baseline']
        # Each round's pair ran back to back, so the ratio of a pair sees the same machine load.
        speedup = f"{med([b / c for b, c in zip(before, now)]):8.2f}x" if before else 'n/a'
        say(f"{case:30s} {med(now):8.3f} {spread(now):>12s} "
            f"{med(samples[case]['current_cpu']):6.3f} "
            f"{(f'{med(before):9.3f}' if before else 'n/a'):>9s} "
            f"{(spread(before) if before else ''):>12s} {speedup:>9s} {med(now) / sort_s:9.1f}x")
    say(f"{SORTED:30s} {sort_s:8.3f} {spread(samples[SORTED]['current']):>12s} "
        f"{med(samples[SORTED]['current_cpu']):6.3f}")
    say(line)
    headline = med(samples['simulate, epoch times, ids']['current']) * 100_000 / args.count
    say(f"simulate (epoch times, ids) for 100k backups: {headline:.3f} s "
        f"(target <= {TARGET_SECONDS:.1f} s) {'MET' if headline <= TARGET_SECONDS else 'MISSED'}"
        + ('' if args.count == 100_000 else f" (scaled linearly from {args.count})"))
    say("  seconds are wall time, cpu this process's CPU time (current code); speed-up: baseline /"
        " current, median of the per-round pairs; / sorted(): the call's time in plain sorts of"
        " the same times")
    if baseline:
        say(f"same marks as the baseline: {'no' if failures else 'yes'} (all inputs)")
    if args.profile:
        case = 'simulate, epoch times, ids'
        say(line)
        say(f"cProfile of the current code, {case}:")
        say(profile(current, case, inputs[case], args.timezone))
    if args.json:
        with open(args.json, 'w') as handle:
            json.dump({'count': args.count, 'policy': POLICY, 'timezone': args.timezone,
                       'baseline': args.baseline, 'load': [load_start, load_end],
                       'samples': samples}, handle, indent=1)
    for failure in failures:
        say(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
