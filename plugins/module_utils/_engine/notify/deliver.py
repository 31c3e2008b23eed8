"""Sending an event to the targets its matchers choose, and the vzdump event of a run.

Delivery never fails the run that notifies: each target that cannot deliver, and a
notifications.cfg that cannot be read, becomes a warning line in the log and a ``failed`` entry
in what :func:`deliver` returns; every secret of the target is masked in it.
"""
from __future__ import annotations

import socket
from typing import Callable, Dict, List, Optional

from ..errors import GuestvaultError
from ..policy.notifications_cfg import (Entry, NotificationConfig, decode_base64,
                                        load_notifications)
from ..policy.notify_match import matched_targets
from .event import Event, make_event
from .targets import target_for

# PVE cuts the logs of a vzdump mail at 1 MiB.
MAX_LOG_SIZE = 1 << 20


def mask(text: str, secrets) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, '<masked>')
    return text


def fqdn() -> str:
    return socket.getfqdn()


def deliver(event: Event, config: NotificationConfig,
            log: Callable[[str], None] = lambda m: None) -> List[Dict]:
    """Send ``event`` to each target its matchers choose, once; ``[{'target', 'ok', 'answer' or
    'error'}]``."""
    outcomes = []
    names = matched_targets(config.matchers.values(), event.severity, event.fields,
                            event.timestamp)
    for name in names:
        entry = config.targets[name]
        if entry.disabled:
            log(f"notification target '{name}' is disabled; skipped")
            continue
        outcomes.append(send_to(entry, event, log))
    return outcomes


def send_to(entry: Entry, event: Event, log: Callable[[str], None]) -> Dict:
    """One target's delivery, as deliver() reports it."""
    secrets = _entry_secrets(entry)
    try:
        answer = target_for(entry, f"root@{fqdn()}").send(event)
    except Exception as exc:    # noqa: BLE001 - whatever a target raises, the run goes on
        reason = mask(str(exc) if isinstance(exc, GuestvaultError)
                      else f"{type(exc).__name__}: {exc}", secrets)
        log(f"WARNING: notification to target '{entry.name}' failed: {reason}")
        return {'target': entry.name, 'type': entry.type, 'ok': False, 'error': reason}
    answer = mask(answer, secrets)
    log(f"notification sent to target '{entry.name}' ({entry.type}): {answer}")
    return {'target': entry.name, 'type': entry.type, 'ok': True, 'answer': answer}


def _entry_secrets(entry):
    """Every secret of a target, also a webhook secret's decoded value (checked when read)."""
    values = [entry.secrets.get('password'), entry.secrets.get('token')]
    for secret in entry.secrets.get('secret', []):
        values += [secret.get('value'), decode_base64(secret.get('value', ''), 'secret')]
    return [v for v in values if v]


def test_event(target: str, hostname: str, config_dir: str,
               log: Callable[[str], None] = lambda m: None) -> Event:
    """The event of PVE's "Test" button for one target (its ``test-*`` templates)."""
    return make_event('test', 'info', {'type': 'test', 'hostname': hostname},
                      {'hostname': hostname, 'fqdn': fqdn(), 'target': target}, config_dir, log)


# --------------------------------------------------------------------------- vzdump

def legacy_config(mailto: List[str]) -> NotificationConfig:
    """PVE's legacy mail: one sendmail target for the run's ``mailto`` and one matcher that
    takes everything; nothing of notifications.cfg. The names cannot clash with a declared
    one ('<' is not allowed in names)."""
    name = f"<{','.join(mailto)}>"
    return NotificationConfig(
        targets={name: Entry('sendmail', name, {'mailto': list(mailto),
                                                'author': 'vzdump backup tool'})},
        matchers={f"<matcher-{name}>": Entry('matcher', f"<matcher-{name}>",
                                             {'target': [name]})})


def vzdump_config(mode: str, mailto: List[str], policy: str, failed: bool,
                  config_dir: str) -> Optional[NotificationConfig]:
    """Where a vzdump run's event goes, as PVE's VZDump.pm decides: with ``legacy-sendmail``,
    or ``auto`` and a ``mailto``, a mail to ``mailto`` (only on failure with
    ``mailnotification failure``; None: nothing to send); else the node's notifications.cfg."""
    if mode == 'legacy-sendmail' or (mode == 'auto' and mailto):
        if mailto and (policy == 'always' or failed):
            return legacy_config(mailto)
        return None
    return load_notifications(config_dir)


def guest_table(guests: List[Dict]) -> Dict:
    """PVE's guest table: ``guests`` as ``{vmid, name, status, time, size, filename}``."""
    columns = [('VMID', 'vmid', None), ('Name', 'name', None), ('Status', 'status', None),
               ('Time', 'time', 'duration'), ('Size', 'size', 'human-bytes'),
               ('Filename', 'filename', None)]
    return {'schema': {'columns': [dict({'label': label, 'id': key},
                                        **({'renderer': renderer} if renderer else {}))
                                   for label, key, renderer in columns]},
            'data': guests}


def vzdump_event(guests: List[Dict], total_seconds: float, logs: str, hostname: str,
                 config_dir: str, job_id: Optional[str] = None, error: Optional[str] = None,
                 log: Callable[[str], None] = lambda m: None) -> Event:
    """The one ``type=vzdump`` event of a run of several guests: severity error when a guest
    failed or ``error`` (a problem outside the guests) is set."""
    failed = error or any(g['status'] != 'ok' for g in guests)
    status = 'backup failed' if failed else 'backup successful'
    if error and '\n' in error:
        status += ': multiple problems'
    elif error:
        status, error = f"{status}: {error}", None
    if len(logs) > MAX_LOG_SIZE:
        logs = "The log is too long to be sent (over 1 MiB); read it on the node.\n"
    data = {'hostname': hostname, 'fqdn': fqdn(), 'error': error,
            'guest-table': guest_table(guests), 'logs': logs, 'status-text': status,
            'total-size': sum(g['size'] for g in guests if g['status'] == 'ok'),
            'total-time': int(total_seconds)}
    fields = {'type': 'vzdump', 'hostname': hostname}
    if job_id:
        fields['job-id'] = job_id
    return make_event('vzdump', 'error' if failed else 'info', fields, data, config_dir, log)


def notify_vzdump(options: Dict, guests: List[Dict], total_seconds: float, logs: str,
                  hostname: str, config_dir: str, job_id: Optional[str] = None,
                  error: Optional[str] = None,
                  log: Callable[[str], None] = lambda m: None) -> List[Dict]:
    """Build and deliver a run's vzdump event with its options (``notification-mode``,
    ``mailto``, ``mailnotification``); what deliver() returns. Nothing here raises: a
    notifications.cfg that does not parse is logged, and the run's result stays its own."""
    failed = bool(error) or any(g['status'] != 'ok' for g in guests)
    return _send(lambda: vzdump_config(options.get('notification-mode') or 'auto',
                                       options.get('mailto') or [],
                                       options.get('mailnotification') or 'always', failed,
                                       config_dir),
                 lambda: vzdump_event(guests, total_seconds, logs, hostname, config_dir, job_id,
                                      error, log), log)


def _send(config_of, event_of, log) -> List[Dict]:
    """deliver(event_of(), config_of()); a config or template error is a logged failure."""
    try:
        config = config_of()
        if config is None:
            return []
        event = event_of()
    except GuestvaultError as exc:
        log(f"WARNING: no notification sent: {exc}")
        return [{'target': None, 'ok': False, 'error': str(exc)}]
    return deliver(event, config, log)


# --------------------------------------------------------------------------- gc, verify, prune

def notify_operation(kind: str, policy: str, fields: Dict[str, str], summary: str,
                     config_dir: str, error: Optional[str] = None,
                     log: Callable[[str], None] = lambda m: None) -> List[Dict]:
    """The ``type=<kind>`` event (gc, verify, prune) of one operation, to the targets of
    notifications.cfg, as ``policy`` says: ``always``, only on ``error``, or ``never``.
    ``fields`` name the storage (``datastore`` for a datastore, as PBS, and ``storage``)."""
    if policy == 'never' or (policy == 'error' and not error):
        return []
    data = {'datastore': fields.get('datastore') or fields.get('storage'), 'error': error,
            'summary': summary, 'fqdn': fqdn(), 'hostname': fields.get('hostname'),
            'status-text': 'failed' if error else 'successful'}
    return _send(lambda: load_notifications(config_dir),
                 lambda: make_event(kind, 'error' if error else 'info', dict(fields, type=kind),
                                    data, config_dir, log), log)


def failure_warnings(outcomes: List[Dict]) -> List[str]:
    """A module's warnings of what deliver() returned: each target that failed, and why."""
    return [f"notification to target '{o['target']}' failed: {o['error']}" if o['target']
            else f"no notification sent: {o['error']}" for o in outcomes if not o['ok']]
