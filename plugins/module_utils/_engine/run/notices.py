"""The notification of one module call: a guest_backup's ``type=vzdump`` event, a
garbage_collect's, verify's or prune's ``type=gc|verify|prune`` event (notify/deliver.py).

A notification never changes the call's outcome: a target that cannot deliver is a warning of
the result (and the result's ``notifications`` say what each target did). A request refused as
bad input (ConfigError) notifies nobody: the task fails at once and says why. Check mode
notifies nobody.
"""
from __future__ import annotations

import socket
import time

from ..errors import ConfigError, GuestvaultError
from ..notify.deliver import failure_warnings, notify_operation, notify_vzdump
from ..policy.config import find_storage, load_vzdump_defaults, split_list

NOTIFY_KEYS = ('notification-mode', 'mailto', 'mailnotification')


def notify_options(config_dir, given, job=None):
    """notification-mode, mailto and mailnotification: ``given``'s, else the job's, else
    vzdump.conf's (PVE's order)."""
    defaults = load_vzdump_defaults(config_dir)
    return {key: given.get(key) or (job or {}).get(key) or defaults.get(key)
            for key in NOTIFY_KEYS}


def _with_outcomes(result, outcomes):
    result['notifications'] = outcomes
    result['warnings'] = list(result.get('warnings') or []) + failure_warnings(outcomes)
    return result


def storage_fields(config_dir, storage, dumpdir=None):
    """The event's fields naming where the operation ran: ``storage`` (the id, or the dumpdir),
    and ``datastore`` for a datastore, as PBS names it."""
    fields = {'hostname': socket.gethostname(), 'storage': storage or dumpdir or ''}
    try:
        if storage and find_storage(config_dir, storage).type == 'datastore':
            fields['datastore'] = storage
    except ConfigError:
        pass                     # the operation itself says what is wrong with the storage
    return fields


def notified_operation(kind, request, call, summary_of, failed_of=lambda result: None,
                       log=None):
    """``call()``'s result, with the ``type=<kind>`` event sent as ``request.notify`` says
    (always, error, never); an error of the call is sent too, then raised."""
    if request.notify == 'never' or request.check_mode:
        return call()
    log = log or (lambda message: None)
    fields = storage_fields(request.config_dir, request.storage,
                            getattr(request, 'dumpdir', None))
    try:
        result = call()
    except ConfigError:
        raise
    except GuestvaultError as exc:
        partial = getattr(exc, 'result', None)
        outcomes = notify_operation(kind, request.notify, fields,
                                    summary_of(partial) if partial else '', request.config_dir,
                                    str(exc), log)
        if isinstance(partial, dict):
            _with_outcomes(partial, outcomes)
        raise
    outcomes = notify_operation(kind, request.notify, fields, summary_of(result),
                                request.config_dir, failed_of(result), log)
    return _with_outcomes(result, outcomes)


def notified_backup(request, call, log=None):
    """``call(log)`` (one guest's backup), with the call's one ``type=vzdump`` event, as
    node_command sends one per run: the guest's line in the table and the call's log."""
    lines = [f"guest_backup of guest {request.vmid}"]

    def say(message):
        lines.append(message)
        if log:
            log(message)
    options = notify_options(request.config_dir, {
        'notification-mode': request.notification_mode, 'mailto': [a for text in request.mailto or [] for a in split_list(text)],
        'mailnotification': request.mailnotification})
    guest = {'vmid': request.vmid, 'name': f"VM {request.vmid}", 'status': 'err', 'time': 0,
             'size': 0, 'filename': None}
    started = time.monotonic()
    hostname = request.node or socket.gethostname()
    try:
        result = call(say)
    except ConfigError:
        raise
    except GuestvaultError as exc:
        say(f"ERROR: backup of guest {request.vmid} failed: {exc}")
        guest['time'] = int(time.monotonic() - started)
        notify_vzdump(options, [guest], time.monotonic() - started, '\n'.join(lines), hostname,
                      request.config_dir, error=None, log=say)
        raise
    guest.update(name=result.get('guest_name') or guest['name'], status='ok',
                 time=int(time.monotonic() - started), size=result.get('bytes_written', 0),
                 filename=result.get('backup'))
    outcomes = notify_vzdump(options, [guest], time.monotonic() - started, '\n'.join(lines),
                             hostname, request.config_dir, log=say)
    return _with_outcomes(result, outcomes)
