"""notification_test: send a test notification to one target of notifications.cfg, as PVE's
"Test" button does, and report what its server answered.

Unlike a run's notification, a test that cannot be delivered fails (NotificationFailed): the
answer is the point of the test. The message names the target and the server's answer, never a
secret (notify/deliver.send_to masks them).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from ..errors import ConfigError, NotificationFailed
from ..notify.deliver import send_to, test_event
from ..paths import CONFIG_DIR
from ..policy.notifications_cfg import NOTIFICATIONS_CFG, load_notifications
from .request import Request


@dataclass
class NotificationTestRequest(Request):
    target: str = None
    config_dir: str = CONFIG_DIR
    check_mode: bool = False


def run_notification_test(request, log=None):
    """``{'changed': False, 'target', 'type', 'sent', 'answer'}``; in check mode nothing is sent
    (``sent`` false, no ``answer``)."""
    log = log or (lambda message: None)
    config = load_notifications(request.config_dir)
    entry = config.targets.get(request.target)
    if entry is None:
        raise ConfigError(f"no notification target '{request.target}' in "
                          f"{os.path.join(request.config_dir, NOTIFICATIONS_CFG)} (or built in); "
                          f"targets: {', '.join(config.targets)}")
    result = {'changed': False, 'target': entry.name, 'type': entry.type, 'sent': False}
    if request.check_mode:
        return result
    # A disabled target is tested all the same: the test is how it is checked before enabling.
    outcome = send_to(entry, test_event(entry.name, socket.gethostname(), request.config_dir,
                                        log), log)
    if not outcome['ok']:
        raise NotificationFailed(f"test notification failed: {outcome['error']}")
    return dict(result, sent=True, answer=outcome['answer'])
