"""The engine's one exception hierarchy.

Every error says what was wrong and what the user can do about it. Modules turn these into
``fail_json(msg=str(err))``, the node command into one line on stderr and a non-zero exit.
"""


class GuestvaultError(Exception):
    """Base of every error the engine raises on purpose."""


class ConfigError(GuestvaultError):
    """A configuration file, a registry entry or an option is malformed or contradictory."""


class GuestNotFound(GuestvaultError):
    """The vmid is not in the node's guest registry."""


class GuestUnreachable(GuestvaultError):
    """The guest's QMP socket is missing, refuses connections or is not QEMU."""


class QmpCommandFailed(GuestvaultError):
    """QEMU answered a command with an error."""

    def __init__(self, command, error_class, description):
        super().__init__(f"QEMU refused {command}: {description} ({error_class})")
        self.command = command
        self.error_class = error_class
        self.description = description


class DiskSelectionError(GuestvaultError):
    """include/exclude name unknown disks, or nothing is left to back up."""


class StorageError(GuestvaultError):
    """The storage is missing, not writable, full, or a path escapes it."""


class VerifyFailed(StorageError):
    """A backup's files do not match its manifest; ``result`` holds what verify found."""

    def __init__(self, message, result=None):
        super().__init__(message)
        self.result = result


class LockTimeout(GuestvaultError):
    """Another run holds the guest's lock for longer than lockwait."""


class ChainError(GuestvaultError):
    """An incremental backup is impossible: the chain or its bitmap is missing or invalid."""


class BackupFailed(GuestvaultError):
    """A backup job failed or was cancelled; nothing was kept."""


class ArchiveError(GuestvaultError):
    """tar or a compressor failed while writing or reading a vzdump archive; the message names
    the tool and ends with the tail of its own error output."""


class HookFailed(GuestvaultError):
    """The hook script exited non-zero in a phase that aborts the backup."""


class AgentError(GuestvaultError):
    """The guest agent did not answer, or refused a command."""


class ConsistencyError(GuestvaultError):
    """The consistency mode could not be applied (e.g. the guest did not stop within stopwait)."""


class ContainerError(GuestvaultError):
    """An lxc-* command failed: a container could not be started, frozen, thawed or read."""


class NotesTemplateError(ConfigError):
    """A notes template names an unknown variable or is malformed."""


class MissingLibrary(GuestvaultError):
    """A Python library the requested feature needs is not installed; the message names it."""

    def __init__(self, library, feature, debian_package=None, error=None, on_pypi=True):
        ways = f"'pip install {library}'" if on_pypi else ''
        if debian_package:
            ways = f"'apt-get install {debian_package}'" + (f" or {ways}" if ways else '')
        detail = f" ({error})" if error else ""
        super().__init__(f"{feature} needs the Python library {library}, which is not installed"
                         f"{detail}; install it with {ways} for the interpreter that runs "
                         "guestvault")
        self.library = library


class EncryptionKeyError(ConfigError):
    """An encryption key is missing, malformed, locked by another passphrase, or not the key the
    data was written with. Messages name keys by fingerprint only, never by their bytes."""


class CorruptData(StorageError):
    """A stored file is damaged or not in the format it claims: unknown magic, bad checksum,
    wrong size, a digest that does not match its data."""


class BackupDamaged(CorruptData):
    """The backup asked for is listed as damaged (its manifest cannot be read); ``damaged`` is the
    storage's ``DamagedBackup`` (id, path, reason)."""

    def __init__(self, message, damaged=None):
        super().__init__(message)
        self.damaged = damaged


class NotificationFailed(GuestvaultError):
    """A notification target could not deliver: the message names the target and what its
    server (or sendmail) answered, never a secret. It is a warning of the run, never its
    failure."""
