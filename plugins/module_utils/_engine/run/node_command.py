"""guestvault-dump: the node command, with vzdump's flags; what scheduled jobs run.

Guests are backed up one after another. Each successful backup is followed by a prune of that
guest on the storage; a failing guest does not stop the others, but the command exits non-zero.
Job-level hook phases (``job-init``, ``job-start``, ``job-end``, ``job-abort``) run around the
guests, and a job's state (last run, result, per-guest outcome) is written for ``--job`` runs.
After the guests, one ``type=vzdump`` notification tells the run's outcome (notify/deliver.py):
to ``mailto`` (legacy mail), or to the targets of notifications.cfg its matchers choose. A
notification that cannot be delivered is a warning; it never changes the exit code.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone

from ..errors import ConfigError, GuestvaultError
from ..restore import appliance
from ..guest.registry import list_guests
from ..paths import default_config_dir, state_dir
from ..notify.deliver import notify_vzdump
from ..policy.config import inert_option_warning, load_vzdump_defaults, split_list
from ..policy.jobs_cfg import load_jobs
from ..storage.files import write_file_atomic
from ..times import format_time
from ..vocabulary import CHAIN_PERIODS, COMPRESS, LEVELS, MAIL_POLICIES, MODES, NOTIFICATION_MODES
from .guest_backup import GuestBackupRequest, run_guest_backup
from . import leftovers
from .hooks import HookScript
from .locate import open_storage
from .notices import notify_options
from .prune import PruneRequest, damaged_warning, prune_guest, resolve_policy


def build_parser():
    parser = argparse.ArgumentParser(
        prog='guestvault-dump',
        description="Back up the QEMU VMs and LXC containers of this node, as Proxmox's "
                    "vzdump does.")
    parser.add_argument('vmid', nargs='*', type=int, help='guests to back up')
    parser.add_argument('--all', action='store_true', help='every guest in the registry')
    parser.add_argument('--exclude', default='', help='vmids to leave out (with --all/--pool)')
    parser.add_argument('--pool', help="guests of this pool (registry 'pool:')")
    parser.add_argument('--job', help='run the job with this id from jobs.cfg')
    parser.add_argument('--mode', choices=MODES)
    parser.add_argument('--storage')
    parser.add_argument('--dumpdir')
    parser.add_argument('--compress', choices=COMPRESS)
    parser.add_argument('--level', choices=LEVELS)
    parser.add_argument('--chain')
    parser.add_argument('--chain-period', choices=CHAIN_PERIODS)
    parser.add_argument('--prune-backups', help='e.g. keep-last=3,keep-daily=7')
    parser.add_argument('--notes-template')
    parser.add_argument('--protected', type=int, choices=(0, 1))
    parser.add_argument('--script', help='hook script')
    parser.add_argument('--bwlimit', type=int, help='KiB/s')
    parser.add_argument('--lockwait', type=float, help='minutes')
    parser.add_argument('--stopwait', type=float, help='minutes')
    parser.add_argument('--exclude-path', action='append', default=None, metavar='PATTERN',
                        help="containers: leave out files matching PATTERN (anchored at the "
                             "container's root when it starts with /); repeatable")
    parser.add_argument('--stdexcludes', type=int, choices=(0, 1),
                        help='containers: leave out /tmp/?*, /var/tmp/?*, /var/run/?*.pid '
                             '(default 1)')
    parser.add_argument('--tmpdir', help="containers: where suspend mode copies the container")
    parser.add_argument('--zstd', type=int, help='zstd threads (0: half of the cores)')
    parser.add_argument('--pigz', type=int, help='gzip with pigz on N threads when N > 0')
    parser.add_argument('--stdout', action='store_true',
                        help="write one container's archive to standard output (no storage, "
                             "no notes, no protection, no prune); messages go to stderr")
    parser.add_argument('--mailto', action='append', default=None, metavar='ADDRESS',
                        help='mail the outcome to ADDRESS (repeatable; a list is split at '
                             'commas); with notification mode auto this means legacy mail')
    parser.add_argument('--mailnotification', choices=MAIL_POLICIES,
                        help="legacy mail: 'always' (default) or only on 'failure'")
    parser.add_argument('--notification-mode', choices=NOTIFICATION_MODES,
                        help="'auto' (default: legacy mail when mailto is set, else the "
                             "targets of notifications.cfg), 'legacy-sendmail' or "
                             "'notification-system'")
    parser.add_argument('--config-dir', default=default_config_dir())
    parser.add_argument('--node', default=socket.gethostname())
    parser.add_argument('--quiet', action='store_true', help='no progress, errors only')
    parser.add_argument('--cleanup', action='store_true',
                        help="clear what killed runs left (block jobs, target nodes, hidden "
                             "directories, orphan bitmaps; of a container: frozen or stopped "
                             "by the run, its temporary copy, snapshots and partial archive) "
                             "instead of backing up")
    parser.add_argument('--build-appliance', action='store_true',
                        help="build the file-restore appliance now (from Debian's packages, "
                             "into $GUESTVAULT_APPLIANCE_CACHE), so that file_restore needs "
                             "no Debian mirror later; back up nothing")
    return parser


def _job_settings(args):
    """Options of ``--job`` from jobs.cfg, with command-line flags taking precedence."""
    jobs = load_jobs(args.config_dir)
    if args.job not in jobs:
        raise ConfigError(f"no job '{args.job}' in {os.path.join(args.config_dir, 'jobs.cfg')}; "
                          f"jobs: {', '.join(sorted(jobs)) or 'none'}")
    declared = jobs[args.job]
    job = declared.options
    settings = {
        'vmid': args.vmid or job.get('vmid') or [], 'all': args.all or job.get('all', False),
        'pool': args.pool or job.get('pool'),
        'exclude': _vmids(args.exclude) or job.get('exclude') or [],
        'job': declared,
    }
    for key in ('mode', 'storage', 'dumpdir', 'compress', 'level', 'chain', 'bwlimit',
                'script', 'lockwait', 'stopwait', 'stdexcludes', 'tmpdir', 'zstd', 'pigz'):
        value = getattr(args, key)
        settings[key] = value if value is not None else job.get(key)
    settings['exclude_path'] = args.exclude_path or job.get('exclude-path')
    settings['notes_template'] = args.notes_template or job.get('notes-template')
    settings['prune_backups'] = args.prune_backups or job.get('prune-backups')
    settings['protected'] = bool(args.protected) if args.protected is not None \
        else job.get('protected')
    settings['chain_period'] = args.chain_period or job.get('chain-period', 'none')
    settings['notify'] = _notify_options(args, job)
    return settings


def _notify_options(args, job):
    """notification-mode, mailto and mailnotification of the command line, the job, vzdump.conf."""
    return notify_options(args.config_dir, {
        'notification-mode': args.notification_mode,
        'mailto': [a for text in args.mailto or [] for a in split_list(text)],
        'mailnotification': args.mailnotification}, job)


def _say(message):
    sys.stdout.write(message + '\n')
    sys.stdout.flush()


def _say_on_stderr(message):
    """With --stdout, standard output carries the archive alone."""
    sys.stderr.write(message + '\n')
    sys.stderr.flush()


def _vmids(text):
    return [int(v) for v in str(text or '').replace(';', ',').split(',') if v.strip()]


def _plain_settings(args):
    settings = {key: getattr(args, key) for key in (
        'mode', 'storage', 'dumpdir', 'compress', 'level', 'chain', 'bwlimit', 'script',
        'lockwait', 'stopwait', 'pool', 'all', 'exclude_path', 'stdexcludes', 'tmpdir', 'zstd',
        'pigz')}
    settings.update(vmid=args.vmid, exclude=_vmids(args.exclude), job=None,
                    notes_template=args.notes_template, prune_backups=args.prune_backups,
                    protected=None if args.protected is None else bool(args.protected),
                    chain_period=args.chain_period or 'none', notify=_notify_options(args, {}))
    return settings


def select_guests(config_dir, settings):
    """The vmids to back up, in order; ConfigError if the selection names nobody."""
    registered = {g.vmid: g for g in list_guests(config_dir)}
    if settings['vmid']:
        chosen = list(settings['vmid'])
    elif settings['all']:
        chosen = sorted(registered)
    elif settings['pool']:
        chosen = sorted(v for v, g in registered.items() if g.pool == settings['pool'])
    else:
        raise ConfigError("no guests selected: give vmids, --all or --pool")
    both = sorted(set(chosen) & set(settings['exclude'])) if settings['vmid'] else []
    if both:
        raise ConfigError(f"guest(s) {', '.join(map(str, both))} are both selected and "
                          "excluded; name each guest once")
    chosen = [v for v in chosen if v not in settings['exclude']]
    if not chosen:
        raise ConfigError("the selection leaves no guest to back up")
    return chosen


class Progress:
    """A percentage on a terminal; silent otherwise (timers, pipes)."""

    def __init__(self, enabled):
        self.enabled = enabled and sys.stderr.isatty()
        self.last = -1

    def __call__(self, done, total):
        if not self.enabled or not total:
            return
        percent = int(done * 100 / total)
        if percent != self.last:
            self.last = percent
            sys.stderr.write(f"\r  {percent:3d}% of {total / (1 << 20):.0f} MiB")
            sys.stderr.flush()

    def end(self):
        if self.enabled and self.last >= 0:
            sys.stderr.write('\n')
        self.last = -1


def run(argv=None):
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)     # for the notification's log
    show = (lambda message: None) if args.quiet else (_say_on_stderr if args.stdout else _say)
    lines = []      # the run's log, for its notification

    def say(message):
        lines.append(message)
        show(message)
    if args.build_appliance:
        return _build_appliance(say)
    settings = _job_settings(args) if args.job else _plain_settings(args)
    job = settings['job']
    if job and not job.runs_on(args.node):
        say(f"job {args.job} does not run on node {args.node}; nothing to do")
        return 0
    if args.cleanup:
        return _cleanup(args, settings, say)
    if job and not job.enabled:
        say(f"job {args.job} is disabled; nothing to do")
        return 0
    vmids = select_guests(args.config_dir, settings)
    if args.stdout:
        return _to_stdout(args, settings, vmids, say)
    # Once per run, not once per guest: options read but not acted on yet.
    for warning in (inert_option_warning(load_vzdump_defaults(args.config_dir), 'vzdump.conf'),
                    job and inert_option_warning(job.options, f"job {job.id} (jobs.cfg)")):
        if warning:
            say(f"WARNING: {warning}")
    started = datetime.now(timezone.utc)
    outcomes = {}
    try:
        _run_guests(args, settings, vmids, outcomes, say)
    except GuestvaultError as exc:
        # the run stopped outside a guest (a job hook, the storage): that is news too
        _notify(args, settings, vmids, outcomes, started, lines, say, error=str(exc))
        raise
    failed = [v for v, o in outcomes.items() if o['result'] != 'ok']
    say(f"{len(vmids) - len(failed)} of {len(vmids)} guest(s) backed up"
        + (f"; failed: {', '.join(map(str, failed))}" if failed else ''))
    notified = _notify(args, settings, vmids, outcomes, started, lines, say)
    if args.job:
        _write_state(args.job, started, outcomes, notified)
    return 1 if failed else 0


def _run_guests(args, settings, vmids, outcomes, say):
    """Each guest in turn, inside the job's hook phases; ``outcomes`` filled as they end."""
    hook = HookScript(settings['script']) if settings['script'] else None
    store = open_storage(args.config_dir, settings['storage'], settings['dumpdir'], args.node)
    env = {'STOREID': settings['storage'] or '', 'DUMPDIR': store.path if store else ''}
    if hook:
        hook.run('job-init', env=env, log=say)
        hook.run('job-start', env=env, log=say)
    progress = Progress(not args.quiet)
    try:
        for vmid in vmids:
            outcomes[vmid] = _one_guest(args, settings, vmid, say, progress)
    except BaseException:
        if hook:
            hook.run('job-abort', env=env, log=say)
        raise
    failed = any(o['result'] != 'ok' for o in outcomes.values())
    if hook:
        hook.run('job-abort' if failed else 'job-end', env=env, log=say)


def _notify(args, settings, vmids, outcomes, started, lines, say, error=None):
    """The run's one vzdump notification; what each target did (failures are warnings)."""
    names = {guest.vmid: guest.name for guest in list_guests(args.config_dir)}
    guests = [{'vmid': vmid, 'name': names.get(vmid) or f"VM {vmid}",
               'status': 'ok' if outcomes.get(vmid, {}).get('result') == 'ok' else 'err',
               'time': int(outcomes.get(vmid, {}).get('seconds', 0)),
               'size': outcomes.get(vmid, {}).get('size', 0),
               'filename': outcomes.get(vmid, {}).get('backup')}
              for vmid in vmids]
    command = ' '.join(['guestvault-dump'] + args.argv)
    elapsed = (datetime.now(timezone.utc) - started).total_seconds()
    return notify_vzdump(settings['notify'], guests, elapsed, command + '\n\n' + '\n'.join(lines),
                         args.node, args.config_dir, args.job, error, say)


def _build_appliance(say):
    """--build-appliance: the image file_restore boots, built unless it is there already."""
    built = appliance.image(say)
    # one line on stdout: what the node role registers
    sys.stdout.write(f"appliance {built.key} {built.directory}\n")
    return 0


def _cleanup(args, settings, say):
    """--cleanup: each selected guest's leftovers of killed runs, cleared; 1 if one failed."""
    store = open_storage(args.config_dir, settings['storage'], settings['dumpdir'], args.node)
    failed = []
    for vmid in select_guests(args.config_dir, settings):
        try:
            if not leftovers.clear_guest(vmid, args.config_dir, store,
                                         lambda m, v=vmid: say(f"  {v}: {m}")):
                say(f"  {vmid}: nothing left over")
        except GuestvaultError as exc:
            say(f"ERROR: clean-up of guest {vmid} failed: {exc}")
            failed.append(vmid)
    return 1 if failed else 0


def _to_stdout(args, settings, vmids, say):
    """--stdout: one container's archive on standard output, nothing else (as vzdump)."""
    if len(vmids) != 1:
        raise ConfigError(f"--stdout writes one guest's archive, and the selection names "
                          f"{len(vmids)} ({', '.join(map(str, vmids))}); give one vmid")
    if sys.stdout.isatty():
        raise ConfigError("--stdout would write the archive to a terminal; redirect it to a "
                          "file or a pipe (e.g. '| guestvault-pct restore 300 -')")
    try:
        result = run_guest_backup(_request(args, settings, vmids[0], sys.stdout.buffer),
                                  log=lambda m: say(f"  {vmids[0]}: {m}"))
    except GuestvaultError as exc:
        say(f"ERROR: backup of guest {vmids[0]} failed: {exc}")
        return 1
    sys.stdout.buffer.flush()
    for warning in result['warnings']:
        say(f"WARNING: {vmids[0]}: {warning}")
    say(f"{result['bytes_written']} bytes written to standard output ({result['mode']} mode)")
    return 0


def _request(args, settings, vmid, stdout=None):
    return GuestBackupRequest(
        vmid=vmid, storage=settings['storage'], dumpdir=settings['dumpdir'],
        config_dir=args.config_dir, level=settings['level'] or 'auto', chain=settings['chain'],
        chain_period=settings['chain_period'], mode=settings['mode'],
        bwlimit=settings['bwlimit'], compress=settings['compress'],
        notes_template=settings['notes_template'], protected=settings['protected'],
        script=settings['script'], lockwait=settings['lockwait'],
        stopwait=settings['stopwait'], node=args.node, warn_inert=False,
        exclude_path=settings['exclude_path'],
        stdexcludes=None if settings['stdexcludes'] is None else bool(settings['stdexcludes']),
        tmpdir=settings['tmpdir'], zstd=settings['zstd'], pigz=settings['pigz'], stdout=stdout)


def _one_guest(args, settings, vmid, say, progress):
    request = _request(args, settings, vmid)
    t0 = time.monotonic()
    try:
        result = run_guest_backup(request, log=lambda m: say(f"  {vmid}: {m}"), progress=progress)
    except GuestvaultError as exc:
        progress.end()
        say(f"ERROR: backup of guest {vmid} failed: {exc}")
        return {'result': 'error', 'error': str(exc), 'seconds': round(time.monotonic() - t0, 3)}
    progress.end()
    outcome = {'result': 'ok', 'backup': result['backup'], 'level': result['level'],
               'size': result.get('bytes_written', 0),
               'seconds': round(time.monotonic() - t0, 3), 'warnings': result['warnings']}
    try:
        storage = open_storage(args.config_dir, settings['storage'], settings['dumpdir'],
                               args.node)
        policy, source = resolve_policy(PruneRequest(
            storage=settings['storage'], dumpdir=settings['dumpdir'],
            config_dir=args.config_dir, prune_backups=settings['prune_backups']), storage)
        report, _folds, freed, damaged = prune_guest(storage, vmid, policy, None, False,
                                                     settings['lockwait'] or 180,
                                                     lambda m: say(f"  {vmid}: {m}"))
        outcome['pruned'] = [b['id'] for b in report if b['mark'] == 'remove']
        for broken in damaged:
            outcome['warnings'].append(damaged_warning(broken))
            say(f"WARNING: {vmid}: {damaged_warning(broken)}")
        say(f"  {vmid}: prune ({policy.as_property_string()} from {source}) removed "
            f"{len(outcome['pruned'])} backup(s), freed {freed} bytes")
    except GuestvaultError as exc:
        outcome.update(result='error', error=f"backup kept, but prune failed: {exc}")
        say(f"ERROR: prune of guest {vmid} failed: {exc}")
    return outcome


def _write_state(job_id, started, outcomes, notifications=()):
    state = {'job': job_id, 'started': format_time(started), 'notifications': list(notifications),
             'ended': format_time(datetime.now(timezone.utc)),
             'result': 'ok' if all(o['result'] == 'ok' for o in outcomes.values()) else 'error',
             'guests': {str(v): o for v, o in outcomes.items()}}
    os.makedirs(state_dir(), exist_ok=True)
    write_file_atomic(os.path.join(state_dir(), f"{job_id}.json"),
                      json.dumps(state, indent=2, sort_keys=True) + '\n')


def main(argv=None):
    """Entry point: one line on stderr and exit 2 for a usage or configuration error."""
    try:
        return run(argv)
    except GuestvaultError as exc:
        sys.stderr.write(f"guestvault-dump: {exc}\n")
        return 2
