#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: notification_test
short_description: Send a test notification to one notification target
version_added: 0.1.0
description:
  - Sends a test notification to one target of the node's C(notifications.cfg) (or the
    built-in V(mail-to-root)), as the "Test" button of Proxmox VE's notification targets does,
    and reports what the target's server answered - the SMTP server, C(sendmail), the Gotify
    server or the webhook's HTTP answer.
  - Matchers are not consulted; the named target gets the notification even when it is
    disabled, so a target can be checked before it is enabled.
  - A notification that cannot be delivered fails the task with the target's name and the
    server's answer (for instance a refused login), never a password, token or secret.
  - The notification's words come from the C(test-subject.txt.hbs) and C(test-body.txt.hbs)
    templates, which an admin may override in
    C(<config_dir>/notification-templates/default/), as in Proxmox VE.
author:
  - guestvault developers (@guestvault)
extends_documentation_fragment:
  - guestvault.backup.storage.config_dir
attributes:
  check_mode:
    description: Checks that the target exists and that C(notifications.cfg) parses; sends
      nothing.
    support: full
  diff_mode:
    description: Not applicable; nothing on the node changes.
    support: none
options:
  target:
    description:
      - The name of a target in C(<config_dir>/notifications.cfg) (a V(sendmail), V(smtp),
        V(gotify) or V(webhook) section), or V(mail-to-root).
      - An unknown name fails the task with the list of the node's targets.
    type: str
    required: true
seealso:
  - module: guestvault.backup.node_config
    description: Declares the notification targets and matchers.
"""

EXAMPLES = r"""
- name: Declare an SMTP target
  guestvault.backup.node_config:
    notifications:
      relay:
        type: smtp
        server: mail.example.com
        mode: starttls
        username: backup
        mailto: [ops@example.com]
        from_address: backup@example.com
    notification_secrets:
      relay:
        password: "{{ vault_smtp_password }}"

- name: Check that it delivers
  guestvault.backup.notification_test:
    target: relay
  register: test

- name: Show what the server answered
  ansible.builtin.debug:
    msg: "{{ test.answer }}"
"""

RETURN = r"""
target:
  description: The target tested.
  returned: always
  type: str
  sample: relay
type:
  description: Its type - V(sendmail), V(smtp), V(gotify) or V(webhook).
  returned: always
  type: str
  sample: smtp
sent:
  description: Whether the notification was sent (false in check mode).
  returned: always
  type: bool
answer:
  description: What the target's server answered, in one line.
  returned: when sent
  type: str
  sample: mail.example.com accepted the mail for ops@example.com
"""

from ansible_collections.guestvault.backup.plugins.module_utils._ansible import run_module
from ansible_collections.guestvault.backup.plugins.module_utils._argspec import notification_test_argument_spec
from ansible_collections.guestvault.backup.plugins.module_utils._engine.run.notification_test import NotificationTestRequest, run_notification_test


def main():
    run_module(notification_test_argument_spec(), run_notification_test, NotificationTestRequest)


if __name__ == '__main__':
    main()
