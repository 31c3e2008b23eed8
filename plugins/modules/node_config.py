#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: node_config
short_description: Declare a node's backup defaults, storages and notifications
version_added: 0.1.0
description:
  - Writes the node's C(vzdump.conf), C(storage.cfg) and C(notifications.cfg) (with its secrets
    in C(priv/notifications.cfg)) in Proxmox VE syntax from dictionaries, so the backup modules
    and the node command find their defaults, storages and notification targets there.
  - Every value is checked by the same parser the backup engine uses when it reads the files;
    a value it would refuse (an unknown key, a negative C(bwlimit), a storage without
    C(path), a malformed C(prune-backups)) fails the task with a message naming the key, and
    nothing is written.
  - A file is rewritten, atomically, only when its text changes; the same input always gives
    the same text (keys sorted, C(path) first in a storage), so a second run changes nothing.
  - The missing directory of an enabled C(dir) storage is created with mode C(0750), as Proxmox
    does when it activates the storage (not when C(create-base-path) or C(mkdir) is false, or
    when the storage's C(nodes) does not name this host). A V(datastore) storage's directory is
    left to its first backup.
  - Omitting O(vzdump), O(storages) or O(notifications) leaves that file alone; an empty
    dictionary empties it.
  - O(storages) replaces the whole of C(storage.cfg) - a storage the file holds that is not
    declared (one written by hand, or by another task) is removed from it. Declare every
    storage of the node in one task. RV(removed_storages) names what was removed, and with
    C(--diff) the file's header says so and its before text shows the removed sections.
author:
  - guestvault developers (@guestvault)
attributes:
  check_mode:
    description: Reports whether a file or a storage directory would change, writing nothing.
    support: full
  diff_mode:
    description: Each changed file's text before and after (the header of C(storage.cfg) names
      the storages it removes), and each directory to be created. Secrets (an inline
      C(secret-key), and every value of C(priv/notifications.cfg)) are shown as C(********).
    support: full
options:
  config_dir:
    description: The node's guestvault configuration directory (created if missing).
    type: path
    default: /etc/guestvault
  vzdump:
    description:
      - The whole of C(vzdump.conf), key by key, as in Proxmox's C(vzdump.conf) (C(mode),
        C(bwlimit), C(prune-backups), C(performance), C(notes-template), C(mailto), ...).
      - Keys may be written with C(_) or C(-) (C(prune_backups) or C(prune-backups)).
      - Property strings (C(prune-backups), C(performance), C(fleecing)) may be given as a
        string (C(keep-daily=3,keep-weekly=2)) or as a dictionary of the same keys, again with
        C(_) or C(-); booleans are written C(1)/C(0); C(mailto) and C(exclude-path) may be
        lists. A key whose value is null is left out.
      - Mark a C(notes-template) value C(!unsafe) in playbooks, its C({{guestname}}) is not Jinja.
    type: dict
  storages:
    description:
      - The whole of C(storage.cfg) as a dictionary of storage id to its options, in Proxmox's
        storage.cfg vocabulary - C(type) (V(dir), V(nfs), V(cifs), V(datastore),
        V(s3-endpoint); default V(dir)), C(path) (required but for V(s3-endpoint)), C(content) (a list or a comma-separated string; default
        C(backup)), C(prune-backups) (a string or a dictionary), C(max-protected-backups)
        (C(-1) for unlimited), C(shared), C(disable), C(nodes), ...
      - A V(datastore) storage holds backups in Proxmox Backup Server's datastore format (a
        deduplicating chunk store) at C(path). It takes C(path), C(content),
        C(prune-backups), C(max-protected-backups), C(nodes), C(disable), and for encrypted
        backups C(encryption-key) (the absolute path of a Proxmox Backup Server key file, as
        M(guestvault.backup.encryption_key) creates it) and, for a key protected by a
        passphrase, C(encryption-passphrase-file) (the absolute path of a file whose first
        line is the passphrase). The passphrase itself is never written to C(storage.cfg).
        The datastore's directory is created by its first backup, not by this module.
      - A V(datastore) with C(backend) V(type=s3,client=<endpoint id>,bucket=<bucket>) keeps
        its chunks and snapshots in an S3 bucket, and its C(path) is a local cache that may be
        deleted (it is rebuilt from the bucket). C(backend) may be a string or a dictionary.
      - An V(s3-endpoint) entry is not a storage but the S3 endpoint such a datastore names, as
        in Proxmox Backup Server 4 - C(endpoint) (a host name, optionally with PBS's
        C({{bucket}}.) and C({{region}}) placeholders, or a URL such as
        C(http://10.0.0.5:8333)), C(region), C(access-key), C(secret-key-file) (the absolute path
        of a file whose first line is the secret key; better than C(secret-key)),
        C(path-style), C(port), C(ca-file) or C(fingerprint). A C(secret-key) given inline is
        masked in the diff and makes C(storage.cfg) readable by root only. Mark such a task
        C(no_log).
      - Keys may be written with C(_) or C(-). Storages are written in the order given.
    type: dict
  notifications:
    description:
      - The whole of C(notifications.cfg), Proxmox VE 8's notification targets and matchers, as
        a dictionary of name to its options. Each entry has a C(type) - a target, V(sendmail),
        V(smtp), V(gotify) or V(webhook), or a V(matcher) - and the keys of that section in
        Proxmox's C(notifications.cfg), with C(_) or C(-).
      - V(sendmail) - C(mailto) (a list), C(mailto_user), C(from_address), C(author),
        C(comment), C(disable). The node's C(/usr/sbin/sendmail) delivers.
      - V(smtp) - C(server), C(port), C(mode) (V(insecure), V(starttls) or V(tls)),
        C(username), C(mailto), C(mailto_user), C(from_address), C(author), C(comment),
        C(disable). Its password goes in O(notification_secrets).
      - V(gotify) - C(server), C(comment), C(disable). Its token goes in
        O(notification_secrets).
      - V(webhook) - C(url), C(method) (V(post), V(put) or V(get)), C(header) (a dictionary of
        header name to value), C(body), C(comment), C(disable). C(url), the header values and
        C(body) are Handlebars templates (C({{ title }}), C({{ secrets.NAME }}), ...) - mark them
        C(!unsafe) so Jinja leaves them alone. Header values and the body are stored base64, as
        Proxmox stores them. Secret values go in O(notification_secrets).
      - V(matcher) - C(target) (a list of target names), C(mode) (V(all) or V(any)),
        C(invert_match), C(match_severity), C(match_field) (a list of V(exact:FIELD=VALUE) or
        V(regex:FIELD=PATTERN)), C(match_calendar), C(comment), C(disable).
      - Proxmox's built-ins, the V(mail-to-root) target and the V(default-matcher) matcher
        (every notification to root's mail), stay unless an entry of the same name replaces
        them - for instance C(default-matcher) with C(disable=true).
      - Everything is checked by the parser the backup engine reads the file with; an entry it
        would refuse (an unknown type or key, a matcher naming a missing target, a malformed
        regular expression or calendar, a port out of range) fails the task with a message
        naming the entry and the key, and nothing is written.
      - A secret given here (C(password), C(token), a C(secret) with a value) is refused - it
        belongs in O(notification_secrets).
    type: dict
  notification_secrets:
    description:
      - The secrets of the targets in O(notifications), by target name - C(password) of an
        V(smtp) target, C(token) of a V(gotify) target, C(secret) of a V(webhook) target (a
        dictionary of secret name to value, used in its templates as C({{ secrets.NAME }})).
      - Written only to C(priv/notifications.cfg) in O(config_dir) (mode C(0600), in a
        directory of mode C(0700)), which holds exactly these; never returned, logged or
        shown in a diff.
      - Only together with O(notifications). Omitted, the node keeps no notification secrets.
    type: dict
"""

EXAMPLES = r"""
- name: Backup defaults and a backup storage on every node
  guestvault.backup.node_config:
    vzdump:
      mode: snapshot
      prune_backups: keep-daily=3,keep-weekly=2,keep-monthly=1
      performance:
        max_workers: 4
      notes_template: !unsafe '{{guestname}} on {{node}}'
    storages:
      backup-nfs:
        type: dir
        path: /mnt/backup
        content: [backup]
        prune_backups:
          keep_last: 3
          keep_daily: 13
        max_protected_backups: 10

- name: An encrypted datastore beside a directory storage
  guestvault.backup.node_config:
    storages:
      local:
        path: /var/lib/guestvault
      pbs:
        type: datastore
        path: /srv/datastore
        encryption_key: /etc/guestvault/keys/pbs.json
        encryption_passphrase_file: /etc/guestvault/keys/pbs.pass
        prune_backups: keep-daily=7,keep-weekly=4

- name: An encrypted datastore in an S3 bucket, with a local cache
  guestvault.backup.node_config:
    storages:
      aws:
        type: s3-endpoint
        endpoint: "{{ '{{bucket}}' }}.s3.{{ '{{region}}' }}.amazonaws.com"
        region: eu-central-1
        access_key: AKIAIOSFODNN7EXAMPLE
        secret_key_file: /etc/guestvault/keys/aws.secret
      offsite:
        type: datastore
        path: /var/cache/guestvault/offsite
        backend:
          type: s3
          client: aws
          bucket: acme-guest-backups
        encryption_key: /etc/guestvault/keys/pbs.json
        prune_backups: keep-daily=7,keep-weekly=4

- name: Failed backups mailed through a relay, everything to a chat webhook
  guestvault.backup.node_config:
    notifications:
      relay:
        type: smtp
        server: mail.example.com
        mode: starttls
        username: backup
        mailto: [ops@example.com]
        from_address: backup@example.com
      chat:
        type: webhook
        method: post
        url: !unsafe 'https://chat.example.com/hooks/{{ secrets.token }}'
        header:
          Content-Type: application/json
        body: !unsafe '{"text": "{{ escape title }}"}'
      failures:
        type: matcher
        target: [relay]
        match_severity: error
      default-matcher:
        type: matcher
        target: [chat]
    notification_secrets:
      relay:
        password: "{{ vault_smtp_password }}"
      chat:
        secret:
          token: "{{ vault_chat_token }}"

- name: Only the storages; vzdump.conf stays as it is
  # storage.cfg is replaced as a whole: after this task it holds only "local", and any other
  # storage in it (backup-nfs above, or one written by hand) is gone. Run with --diff to see.
  guestvault.backup.node_config:
    storages:
      local:
        path: /var/lib/guestvault
"""

RETURN = r"""
files:
  description: The files declared by this task, by name, with their path and whether each changed.
  returned: always
  type: dict
  sample:
    vzdump.conf: {path: /etc/guestvault/vzdump.conf, changed: true}
    storage.cfg: {path: /etc/guestvault/storage.cfg, changed: false}
    notifications.cfg: {path: /etc/guestvault/notifications.cfg, changed: true}
    priv/notifications.cfg: {path: /etc/guestvault/priv/notifications.cfg, changed: false}
created_dirs:
  description: Directories created (or, in check mode, that would be) - storage paths, and the
    configuration directory when it was missing.
  returned: always
  type: list
  elements: str
  sample: [/mnt/backup]
storages:
  description: The ids of the declared storages, in C(storage.cfg) order (empty without O(storages)).
  returned: always
  type: list
  elements: str
  sample: [backup-nfs]
notifications:
  description: The names of the declared notification targets and matchers (empty without
    O(notifications)).
  returned: always
  type: list
  elements: str
  sample: [relay, chat, failures]
removed_storages:
  description:
    - The ids of the storages C(storage.cfg) held before that O(storages) leaves out, and that
      are therefore removed from it (or, in check mode, would be); empty without O(storages).
  returned: always
  type: list
  elements: str
  sample: [old-nfs]
"""

from ansible_collections.guestvault.backup.plugins.module_utils._ansible import run_module
from ansible_collections.guestvault.backup.plugins.module_utils._argspec import node_config_argument_spec
from ansible_collections.guestvault.backup.plugins.module_utils._engine.run.node_config import NodeConfigRequest, run_node_config


def main():
    run_module(node_config_argument_spec(), run_node_config, NodeConfigRequest)


if __name__ == '__main__':
    main()
