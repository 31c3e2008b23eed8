"""Consistency modes: what happens to the guest around the backup's point in time.

Each mode is a context manager entered just before the QMP transaction that fixes the point in
time and left right after it, so the guest is disturbed for as short a time as possible:

- ``snapshot``: the guest keeps running; with a guest agent its filesystems are frozen for the
  instant of the transaction (thaw is guaranteed, also when the transaction fails).
- ``suspend``: the vCPUs are paused around the transaction.
- ``stop``: the guest is shut down in an orderly way (agent, else ACPI) within ``stopwait``, the
  point in time is fixed while it is off, and it is started again at once.
"""
from __future__ import annotations

import subprocess
import time
from contextlib import contextmanager

from ..errors import AgentError, ConsistencyError, GuestUnreachable
from .agent import GuestAgent
from .qmp import QmpSession, wait_for_socket

RUNNING = 'running'
# How long a thaw keeps trying after a failed or late freeze (each try waits up to the freeze
# timeout for an answer); the copy is already running meanwhile, so only the end is delayed.
THAW_PATIENCE = 60.0


class ModeReport:
    """What a mode did, for the result and the log."""

    def __init__(self, mode):
        self.mode = mode
        self.frozen = None          # filesystems frozen (snapshot with agent), else None
        self.freeze_seconds = None  # snapshot: from the freeze request to the thaw's answer
        self.pause_seconds = None   # suspend: how long the vCPUs were paused
        self.downtime_seconds = None  # stop: guest off from shutdown request to running again
        self.warnings = []


@contextmanager
def snapshot_mode(qmp, agent_socket, freeze_timeout, log):
    report = ModeReport('snapshot')
    status = qmp.status()
    if status != RUNNING:
        log(f"guest is {status}, not running: its disks are already at rest, no freeze needed")
        yield report
        return
    if not agent_socket:
        report.warnings.append(
            "no guest agent configured: the filesystems were not frozen, so this backup is only "
            "crash-consistent; configure the agent socket (agent:) for an fsfreeze")
        yield report
        return
    agent = GuestAgent(agent_socket, timeout=freeze_timeout)
    try:
        agent.connect()
        agent.ping()
    except AgentError as exc:
        agent.close()
        report.warnings.append(
            f"guest agent not answering ({exc}): the filesystems were not frozen, so this backup "
            "is only crash-consistent")
        yield report
        return
    failed = False
    started = time.monotonic()
    try:
        try:
            report.frozen = agent.freeze()
            log(f"froze {report.frozen} filesystem(s) through the guest agent")
        except AgentError as exc:
            failed = True
            report.warnings.append(f"fsfreeze failed ({exc}): backup is only crash-consistent")
        yield report
    finally:
        # A freeze that timed out may still complete inside the guest: thaw in any case, on a
        # fresh connection since the old one may still carry the late answer.
        if report.frozen is not None or failed:
            if _thaw(agent, report, log, reconnect=failed):
                report.freeze_seconds = round(time.monotonic() - started, 3)
                log(f"the guest's filesystems were frozen for at most "
                    f"{report.freeze_seconds:.3f} s")
        agent.close()


def _thaw(agent, report, log, reconnect=False, patience=THAW_PATIENCE):
    """Thaw, retrying for ``patience`` seconds: an agent that hangs in a freeze (a slow fsfreeze
    hook, a busy guest) answers only after it has frozen, and must not be left frozen."""
    deadline = time.monotonic() + patience
    attempt = 0
    while True:
        attempt += 1
        try:
            if reconnect:
                agent.close()
                agent.connect()
            agent.thaw()
            log("thawed the guest's filesystems")
            return True
        except AgentError as exc:
            if time.monotonic() >= deadline:
                break
            log(f"thaw attempt {attempt} failed ({exc}); trying again")
            reconnect = True
            time.sleep(1)
    report.warnings.append(
        f"could not thaw the guest's filesystems within {patience:g} s: run "
        "'guest-fsfreeze-thaw' through the agent now, or the guest's writes will hang")
    return False


@contextmanager
def suspend_mode(qmp, log):
    report = ModeReport('suspend')
    if qmp.status() != RUNNING:
        yield report
        return
    started = time.monotonic()
    qmp.execute('stop')
    try:
        yield report
    finally:
        qmp.execute('cont')
        report.pause_seconds = round(time.monotonic() - started, 3)
        log(f"guest vCPUs paused for {report.pause_seconds:.3f} s")


class StopMode:
    """Stop mode must swap the QMP session if QEMU exits on shutdown, so it is a class that
    tells its caller about the new session (``on_reconnect``)."""

    def __init__(self, qmp, agent_socket, stopwait_seconds, start_command, hooks, log,
                 on_reconnect=None):
        self.qmp = qmp
        self.on_reconnect = on_reconnect
        self.agent_socket = agent_socket
        self.stopwait = stopwait_seconds
        self.start_command = start_command
        self.hooks = hooks
        self.log = log
        self.report = ModeReport('stop')

    @contextmanager
    def around_point_in_time(self):
        if self.qmp.status() != RUNNING:
            self.log("guest is not running: backing up from its stopped state")
            yield self.report
            return
        started = time.monotonic()
        self.hooks('pre-stop')
        exited = self._shutdown()
        if exited:
            self._start_paused()
        self.hooks('pre-restart')
        try:
            yield self.report
        finally:
            self._resume()
            self.report.downtime_seconds = round(time.monotonic() - started, 3)
            self.log(f"guest was down for {self.report.downtime_seconds:.3f} s")
            self.hooks('post-restart')

    def _shutdown(self):
        """Ask the guest to power off; True if QEMU exited, False if it stays (-no-shutdown)."""
        via = 'ACPI power button'
        if self.agent_socket:
            try:
                with GuestAgent(self.agent_socket, timeout=5) as agent:
                    agent.shutdown()
                via = 'guest agent'
            except AgentError as exc:
                self.log(f"guest agent shutdown failed ({exc}); using the ACPI power button")
                self.qmp.execute('system_powerdown')
        else:
            self.qmp.execute('system_powerdown')
        self.log(f"asked the guest to shut down through the {via}; waiting up to "
                 f"{self.stopwait:g} s")
        deadline = time.monotonic() + self.stopwait
        while time.monotonic() < deadline:
            try:
                status = self.qmp.status()
            except GuestUnreachable:
                return True
            if status == 'shutdown':
                return False
            time.sleep(0.2)
        raise ConsistencyError(
            f"the guest did not shut down within stopwait ({self.stopwait / 60:g} min); it was "
            "left running as it was and no backup was taken. Check that the guest handles ACPI "
            "shutdown (acpid) or configure its guest agent, or raise stopwait")

    def _start_paused(self):
        if not self.start_command:
            raise ConsistencyError(
                "the guest's QEMU exited when the guest shut down and its registry entry has no "
                "start command (start:), so it cannot be brought back; it is left off. Start "
                "QEMU with -no-shutdown, or register a start command that starts it with -S")
        self.log(f"starting the guest again: {self.start_command}")
        proc = subprocess.run(self.start_command, shell=True, capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise ConsistencyError(f"start command failed ({proc.returncode}): "
                                   f"{proc.stderr.strip()}")
        wait_for_socket(self.qmp.socket_path, timeout=30)
        self.qmp.close()
        self.qmp = QmpSession(self.qmp.socket_path).connect()
        if self.on_reconnect:
            self.on_reconnect(self.qmp)
        if self.qmp.status() == RUNNING:
            self.report.warnings.append(
                "the start command let the guest run before the backup's point in time: the "
                "backup is not from the stopped state; start QEMU with -S in the start command")

    def _resume(self):
        if self.qmp.status() == 'shutdown':
            self.qmp.execute('system_reset')
            self._wait_for_reset()
        if self.qmp.status() != RUNNING:
            self.qmp.execute('cont')

    def _wait_for_reset(self, timeout=10.0):
        # QEMU carries out a reset request in its main loop, after the command has returned;
        # 'cont' before that is refused ("Resetting the Virtual Machine is required").
        deadline = time.monotonic() + timeout
        while self.qmp.status() == 'shutdown':
            if time.monotonic() > deadline:
                raise ConsistencyError(
                    "the guest was shut down for the backup but QEMU did not reset it: QEMU "
                    "runs with -no-reboot (or -action reboot=shutdown), which turns system_reset "
                    "into another shutdown; the guest is left off. Start it by hand, and drop "
                    "-no-reboot from its QEMU command line for stop mode")
            time.sleep(0.05)
