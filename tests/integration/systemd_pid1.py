"""A real systemd (the installed ``/lib/systemd/systemd``) as PID 1 of private namespaces, for tests of real timers.

The host's PID 1 need not be systemd: ``unshare`` gives systemd its own PID, mount, cgroup, UTS, IPC and network
namespaces (as PID 1 it sets the hostname and brings up ``lo``: not the host's), and inside them a private ``/run``
(tmpfs), a private cgroup2 tree (a sub-cgroup of the host's, so the host's cgroups stay untouched), a private
``/var/lib/systemd`` (where ``Persistent=`` timers keep their stamps) and a pty as ``/dev/console`` (systemd's log,
read into ``console.log``). ``SYSTEMD_UNIT_PATH`` makes the test's unit directory the only one, so nothing of the
host's ``/etc`` or ``/lib/systemd/system`` is loaded or started: the boot is the stub targets below plus the units a
test installs, and takes well under a second.

    with SystemdPid1(tmp_path) as node:      # nothing runs yet: install units, plant stamps
        node.install_unit('x.timer', text); node.enable('x.timer')
        node.start()                         # "the node boots"
        node.show('x.timer', 'ActiveState')

Needs root, util-linux ``unshare``/``nsenter``, ``systemctl`` and a cgroup2 hierarchy (hybrid or unified). ``stop()``
SIGKILLs the namespace's PID 1: the kernel then kills everything in the namespace, and the sub-cgroup is removed.
"""
import datetime
import os
import pathlib
import shutil
import signal
import subprocess
import threading
import time

SYSTEMD = '/lib/systemd/systemd'
BOOT_TARGET = 'guestvault-test.target'
# Default dependencies of timers and services (Requires=sysinit.target, Before=timers.target, Conflicts=shutdown.target,
# After=basic.target): a Requires= on a unit that is not found fails the start job, so each exists, empty.
STUB_TARGETS = ('sysinit.target', 'basic.target', 'timers.target', 'shutdown.target')
STATE_DIR = '/var/lib/systemd'

# Runs in the new namespaces (as ``sh -c``), then becomes systemd. $1 state dir, $2 console pty, $3 unit dir,
# $4 systemd, $5 the unit to boot into, $6 the (empty) generator directory.
_INNER = r'''
set -eu
mount -t tmpfs -o mode=755 tmpfs /run
umount -R /sys/fs/cgroup 2>/dev/null || true
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount --bind "$1" /var/lib/systemd
mount --bind "$2" /dev/console
# No generators: the host's (fstab, cryptsetup, ...) are not part of this node; $6 is an empty directory.
export SYSTEMD_UNIT_PATH="$3" SYSTEMD_GENERATOR_PATH="$6" SYSTEMD_ENVIRONMENT_GENERATOR_PATH="$6" container=guestvault-test
exec "$4" --system --unit="$5" --log-target=console --log-level=debug --log-color=no --show-status=no
'''

# Runs on the host: joins the private sub-cgroup first, as the cgroup namespace's root is the cgroup it is made in.
_OUTER = r'''
set -eu
echo $$ > "$1/cgroup.procs"
shift
exec unshare --pid --fork --mount --mount-proc --propagation private --cgroup --uts --ipc --net sh -c "$@"
'''


class SystemdError(RuntimeError):
    pass


def epoch(timestamp):
    """A timestamp of ``SystemdPid1.show`` (``Sun 2026-11-22 05:21:00 UTC``) as epoch seconds; None for ``n/a``/empty."""
    if timestamp in ('', 'n/a'):
        return None
    return int(datetime.datetime.strptime(timestamp, '%a %Y-%m-%d %H:%M:%S UTC').replace(tzinfo=datetime.timezone.utc).timestamp())


def cgroup2_mount():
    """Where the host mounts cgroup2 (``/sys/fs/cgroup/unified`` on a hybrid host), or None."""
    with open('/proc/self/mounts', encoding='utf-8') as mounts:
        for line in mounts:
            _device, path, fstype = line.split()[:3]
            if fstype == 'cgroup2':
                return path
    return None


def missing_prerequisite():
    """Why this machine cannot run ``SystemdPid1`` at all, or None (cheap checks only; ``probe`` tries a boot)."""
    if os.geteuid() != 0:
        return 'needs root (namespaces, mounts, cgroups)'
    if not os.access(SYSTEMD, os.X_OK):
        return f"needs {SYSTEMD} (Debian package systemd)"
    for tool in ('unshare', 'nsenter', 'systemctl'):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not os.path.isdir(STATE_DIR):
        return f"needs {STATE_DIR} as a mount point (Debian package systemd)"
    if cgroup2_mount() is None:
        return 'needs a cgroup2 hierarchy mounted on the host'
    return None


def probe(workdir, timeout=10):
    """None if a minimal systemd boots as PID 1 here within ``timeout`` seconds, else why not (with its log's end)."""
    reason = missing_prerequisite()
    if reason:
        return reason
    node = SystemdPid1(workdir)
    try:
        node.start(timeout=timeout)
    except (SystemdError, OSError, subprocess.SubprocessError) as exc:
        return f"systemd does not run as PID 1 of a PID namespace here: {exc}"
    finally:
        node.stop()
    return None


class SystemdPid1:
    """One "node": a unit directory, a state directory, and (between ``start`` and ``stop``) a systemd as PID 1."""

    def __init__(self, workdir):
        self.workdir = pathlib.Path(workdir)
        self.unit_dir = self.workdir / 'units'
        self.state_dir = self.workdir / 'var-lib-systemd'
        self.console_log = self.workdir / 'console.log'
        self.generator_dir = self.workdir / 'no-generators'
        self.cgroup = None
        self.process = None
        self.pid = None
        self._pty = None
        self._reader = None
        for path in (self.unit_dir, self.state_dir / 'timers', self.generator_dir):
            path.mkdir(parents=True, exist_ok=True)
        for target in STUB_TARGETS:
            self.install_unit(target, f"[Unit]\nDescription=test stub {target}\n")
        # The boot target pulls in timers.target, whose .wants/ holds the enabled timers, as on a real node.
        self.install_unit(BOOT_TARGET, '[Unit]\nDescription=guestvault test node\nWants=timers.target\n')

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------------- units and state, before start

    def install_unit(self, name, text):
        (self.unit_dir / name).write_text(text, encoding='utf-8')

    def enable(self, unit, target='timers.target'):
        """What ``systemctl enable`` does for ``WantedBy=target``: systemctl would write to the host's /etc instead."""
        wants = self.unit_dir / f"{target}.wants"
        wants.mkdir(exist_ok=True)
        link = wants / unit
        if not link.is_symlink():
            link.symlink_to(self.unit_dir / unit)

    def stamp_path(self, timer):
        """The file whose mtime is a ``Persistent=true`` timer's last trigger (``/var/lib/systemd/timers/stamp-*``)."""
        return self.state_dir / 'timers' / f"stamp-{timer}"

    def plant_stamp(self, timer, last_trigger):
        """Pretend ``timer`` last fired at epoch ``last_trigger`` (the node then went down)."""
        path = self.stamp_path(timer)
        path.touch()
        os.utime(path, (last_trigger, last_trigger))

    # ------------------------------------------------------------------------- the running systemd

    def start(self, timeout=10):
        """Boot systemd; return once it says running or degraded, else stop it and raise SystemdError."""
        if self.process is not None:
            raise SystemdError('already started')
        try:
            self.cgroup = self._make_cgroup()
            self._open_console()
            inner_args = [str(self.state_dir), self._pty[1], str(self.unit_dir), SYSTEMD, BOOT_TARGET, str(self.generator_dir)]
            self.process = subprocess.Popen(['sh', '-c', _OUTER, 'sh', self.cgroup, _INNER, 'sh', *inner_args],
                                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            self.pid = self._wait_for_pid1(timeout)
            self._wait_until_up(timeout)
        except BaseException:
            self.stop()                     # whatever went wrong (even ^C), leave no namespace and no cgroup behind
            raise

    def systemctl(self, *args, check=True, timeout=10):
        """``systemctl`` of the namespace's systemd (nsenter: its /run/systemd/private is in its mount namespace)."""
        proc = subprocess.run(['nsenter', '-t', str(self.pid), '-m', '-p', 'systemctl', '--no-pager', *args],
                              capture_output=True, text=True, timeout=timeout, check=False, env=dict(os.environ, TZ='UTC'))
        if check and proc.returncode != 0:
            raise SystemdError(f"systemctl {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def show(self, unit, *properties):
        """``{property: value}``; timestamps in UTC (``Sun 2026-11-22 05:21:00 UTC``): ``show`` ignores --timestamp=."""
        proc = self.systemctl('show', *[f"--property={p}" for p in properties], unit)
        return dict(line.split('=', 1) for line in proc.stdout.splitlines() if '=' in line)

    def log_tail(self, lines=40):
        try:
            return '\n'.join(self.console_log.read_text(errors='replace').splitlines()[-lines:])
        except FileNotFoundError:
            return ''

    def stop(self):
        """Kill PID 1 (SIGKILL: systemd as PID 1 takes SIGTERM as "re-execute"), so the whole namespace, and clean up."""
        if self.process is not None:
            if self.process.poll() is None:
                target = self.pid or self.process.pid
                try:
                    os.kill(target, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            self.process.stdout.close()
            self.process = None
        self.pid = None
        self._close_console()
        self._remove_cgroup()

    # ------------------------------------------------------------------------- helpers

    def _make_cgroup(self):
        path = os.path.join(cgroup2_mount(), f"guestvault-test-{os.getpid()}-{id(self):x}")
        os.makedirs(path, exist_ok=True)
        return path

    def _remove_cgroup(self):
        """Depth first; the namespace's processes may take a moment to leave after PID 1 died."""
        if not self.cgroup:
            return
        deadline = time.monotonic() + 10
        while os.path.isdir(self.cgroup):
            try:
                for parent, dirs, _files in os.walk(self.cgroup, topdown=False):
                    for name in dirs:
                        os.rmdir(os.path.join(parent, name))
                os.rmdir(self.cgroup)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.cgroup = None

    def _open_console(self):
        """A pty for /dev/console: systemd (PID 1) logs there and wants a terminal; a thread copies it to a file."""
        master, slave = os.openpty()
        self._pty = (master, os.ttyname(slave), slave)   # keeping the slave open: the master never sees EIO early
        self._reader = threading.Thread(target=self._copy_console, args=(master,), daemon=True)
        self._reader.start()

    def _copy_console(self, master):
        # Must keep reading: a full pty buffer would block systemd's logging, and so systemd.
        with open(self.console_log, 'ab') as log:
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    return
                if not data:
                    return
                log.write(data.replace(b'\r', b''))    # systemd writes \r\n and the tty makes it \r\r\n
                log.flush()

    def _close_console(self):
        if self._pty is None:
            return
        master, _name, slave = self._pty
        os.close(slave)                     # the master then reads EIO: the reader ends
        self._reader.join(timeout=5)
        os.close(master)
        self._pty = self._reader = None

    def _wait_for_pid1(self, timeout):
        """The host PID of the namespace's PID 1: the only child of ``unshare --fork``."""
        children = f"/proc/{self.process.pid}/task/{self.process.pid}/children"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._fail_if_exited()
            try:
                with open(children, encoding='utf-8') as handle:
                    pids = handle.read().split()
            except FileNotFoundError:
                pids = []
            # Before the exec of unshare, the process is still sh and has no child.
            if pids and os.readlink(f"/proc/{self.process.pid}/exe").endswith('unshare'):
                return int(pids[0])
            time.sleep(0.05)
        raise SystemdError(f"no PID 1 within {timeout} s")

    def _wait_until_up(self, timeout):
        deadline = time.monotonic() + timeout
        state = ''
        while time.monotonic() < deadline:
            self._fail_if_exited()
            try:
                state = self.systemctl('is-system-running', check=False, timeout=5).stdout.strip()
            except subprocess.TimeoutExpired:
                state = 'systemctl timed out'
            if state in ('running', 'degraded'):
                return
            time.sleep(0.1)
        raise SystemdError(f"systemd not up within {timeout} s (is-system-running: {state!r}); log:\n{self.log_tail()}")

    def _fail_if_exited(self):
        if self.process.poll() is not None:
            output = self.process.stdout.read().decode(errors='replace').strip()
            raise SystemdError(f"exited with {self.process.returncode}: {output}; log:\n{self.log_tail()}")
