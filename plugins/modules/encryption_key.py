#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: encryption_key
short_description: Create a Proxmox Backup Server encryption key file and show its fingerprint
version_added: 0.1.0
description:
  - Creates a random 256-bit encryption key in a Proxmox Backup Server key file (the JSON that
    C(proxmox-backup-client key create) writes), readable by its owner only (mode C(0600)),
    written whole or not at all. A V(datastore) storage whose C(encryption-key) in
    C(storage.cfg) names this file encrypts every chunk with it (AES-256-GCM), so copies of
    the datastore are safe off-site.
  - The key file works with Proxmox Backup Server's own tools, and theirs with guestvault.
  - Returns the key's fingerprint as Proxmox Backup Server prints it; every backup's manifest
    records it, so a backup can be matched to its key.
  - Idempotent - when O(path) exists, the key is left alone and its fingerprint returned
    (C(changed=false)); no passphrase is needed for that. A passphrase given then must unlock
    the existing key, or the task fails. O(force) replaces the key.
  - Keep a copy of the key file (and its passphrase) away from the backups - without it, an
    encrypted backup cannot be restored.
author:
  - guestvault developers (@guestvault)
requirements:
  - the Python library cryptography (Debian package python3-cryptography) on the node, for a
    key protected by a passphrase and for encrypted backups
attributes:
  check_mode:
    description: Reports whether a key would be created; writes nothing. A new key's fingerprint is not known until it exists.
    support: full
  diff_mode:
    description: Not applicable; the key is never shown.
    support: none
options:
  path:
    description: Absolute path of the key file. Its directory must exist.
    type: path
    required: true
  kdf:
    description:
      - How the key is protected in the file.
      - V(scrypt) encrypts it with a key derived from a passphrase (scrypt, as Proxmox Backup
        Server does); O(passphrase) or O(passphrase_file) is then needed to create it, and the
        datastore's C(encryption-passphrase-file) to use it.
      - V(none) stores the key unprotected in the file (what Proxmox VE keeps for a Proxmox
        Backup Server storage); protect the file instead.
    type: str
    choices: [scrypt, none]
    default: scrypt
  passphrase:
    description:
      - The passphrase of a V(scrypt) key, at least 5 bytes (Proxmox Backup Server's minimum).
        Never logged; prefer O(passphrase_file), or a vaulted variable.
    type: str
  passphrase_file:
    description:
      - Absolute path of a file whose first line is the passphrase (as Proxmox Backup Server
        reads C(PBS_ENCRYPTION_PASSWORD_FILE)). Give the same file as the datastore's
        C(encryption-passphrase-file).
    type: path
  hint:
    description: A reminder of the passphrase, stored in the key file in the clear and shown when a wrong passphrase is given.
    type: str
  force:
    description:
      - Replace an existing key file with a new key. Backups encrypted with the old key can
        then be restored only with a copy of the old file.
    type: bool
    default: false
notes:
  - The passphrase is never written to C(storage.cfg), to a result, or to a log.
seealso:
  - module: guestvault.backup.node_config
    description: Declares the V(datastore) storage that uses the key.
"""

EXAMPLES = r"""
- name: A passphrase file, readable by root only
  ansible.builtin.copy:
    dest: /etc/guestvault/keys/pbs.pass
    content: "{{ vault_pbs_passphrase }}\n"
    mode: "0600"

- name: The datastore's encryption key
  guestvault.backup.encryption_key:
    path: /etc/guestvault/keys/pbs.json
    passphrase_file: /etc/guestvault/keys/pbs.pass
    hint: the vault entry pbs_passphrase
  register: key

- name: Show the fingerprint that every manifest will record
  ansible.builtin.debug:
    msg: "key {{ key.short_fingerprint }} ({{ key.fingerprint }})"

- name: A datastore that encrypts with it
  guestvault.backup.node_config:
    storages:
      pbs:
        type: datastore
        path: /srv/datastore
        encryption_key: /etc/guestvault/keys/pbs.json
        encryption_passphrase_file: /etc/guestvault/keys/pbs.pass

- name: An unprotected key (the file itself must be kept safe)
  guestvault.backup.encryption_key:
    path: /etc/guestvault/keys/plain.json
    kdf: none
"""

RETURN = r"""
path:
  description: The key file.
  returned: always
  type: str
  sample: /etc/guestvault/keys/pbs.json
fingerprint:
  description:
    - The key's fingerprint, 32 bytes in colon-separated hex, as the key file and the manifests
      record it. Null in check mode for a key not created yet, and for an old key file with a
      passphrase that records none.
  returned: always
  type: str
  sample: "0e:ab:d4:46:0b:6e:b9:ca:34:50:23:de:e2:b7:78:c7:90:e5:4a:16:83:b9:65:9c:0a:57:ae:19:90:90:15:9b"
short_fingerprint:
  description: The first 8 bytes of the fingerprint, the key id Proxmox Backup Server shows and error messages name.
  returned: always
  type: str
  sample: "0e:ab:d4:46:0b:6e:b9:ca"
kdf:
  description: How the key is protected in the file (V(scrypt), V(none), or V(pbkdf2) for an existing file).
  returned: always
  type: str
  sample: scrypt
created:
  description: When the key was created (RFC 3339, as the key file records it); null in check mode for a new key.
  returned: always
  type: str
  sample: "2026-03-10T03:00:00+01:00"
modified:
  description: When the key file was last changed (RFC 3339); null in check mode for a new key.
  returned: always
  type: str
hint:
  description: The passphrase hint stored in the key file, if any.
  returned: always
  type: str
created_file:
  description: Whether this task wrote the key file (in check mode, whether it would).
  returned: always
  type: bool
"""

from ansible_collections.guestvault.backup.plugins.module_utils._ansible import run_module
from ansible_collections.guestvault.backup.plugins.module_utils._argspec import encryption_key_argument_spec
from ansible_collections.guestvault.backup.plugins.module_utils._engine.run.encryption_key import EncryptionKeyRequest, run_encryption_key


def main():
    run_module(encryption_key_argument_spec(), run_encryption_key, EncryptionKeyRequest)


if __name__ == '__main__':
    main()
