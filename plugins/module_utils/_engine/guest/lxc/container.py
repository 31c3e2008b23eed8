"""A container as the lxc-* commands of Debian's ``lxc`` 5 see it: its state, its init's pid,
and the changes a backup makes to it (stop, start, freeze, thaw). Every command is bounded by a
timeout, so a wedged ``lxc-*`` cannot hang a run."""
from __future__ import annotations

import subprocess
import time

from ...errors import ConsistencyError, ContainerError, GuestNotFound

RUNNING = 'RUNNING'
STOPPED = 'STOPPED'
FROZEN = 'FROZEN'
FREEZING = 'FREEZING'
# How long one lxc-info/freeze/thaw may take. These answer in milliseconds; the margin is
# for a machine busy with other guests' backups.
COMMAND_TIMEOUT = 60.0
START_TIMEOUT = 120.0
FREEZE_POLL = 0.01         # seconds between reads of a freezing container's state


class Container:
    """Container ``name`` under ``lxcpath`` (``lxc-* -P <lxcpath> -n <name>``)."""

    def __init__(self, name: str, lxcpath: str):
        self.name = name
        self.lxcpath = lxcpath

    def __repr__(self):
        return f"Container({self.name!r}, {self.lxcpath!r})"

    def _run(self, tool, *args, timeout=COMMAND_TIMEOUT, check=True):
        argv = [tool, '-P', self.lxcpath, '-n', self.name, *args]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  check=False, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise ContainerError(f"{tool} is not installed; install Debian's lxc package "
                                 "(apt-get install lxc) to back up containers") from None
        except subprocess.TimeoutExpired:
            raise ContainerError(f"{' '.join(argv)} did not finish within {timeout:g} s; check "
                                 f"the container with 'lxc-info -P {self.lxcpath} -n "
                                 f"{self.name}'") from None
        if check and proc.returncode != 0:
            if "doesn't exist" in proc.stderr or "does not exist" in proc.stderr:
                raise self.not_found()
            raise ContainerError(f"{' '.join(argv)} failed ({proc.returncode}): "
                                 f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def not_found(self):
        return GuestNotFound(
            f"there is no LXC container '{self.name}' in {self.lxcpath}; list the containers "
            f"there with 'lxc-ls -f -P {self.lxcpath}', and fix 'lxc:' or 'lxcpath:' in the "
            "guest's registry entry")

    def state(self) -> str:
        """RUNNING, STOPPED, FROZEN (or a transitional state LXC reports, e.g. STOPPING)."""
        return self._run('lxc-info', '-s', '-H').stdout.strip()

    def init_pid(self) -> int:
        """The pid of the container's init on the host; ContainerError when it is not running."""
        text = self._run('lxc-info', '-p', '-H').stdout.strip()
        if not text.isdigit():
            raise ContainerError(f"container {self.name} has no init process (state "
                                 f"{self.state()}); start it with 'lxc-start -P {self.lxcpath} "
                                 f"-n {self.name}'")
        return int(text)

    def stop(self, timeout: float) -> None:
        """A clean shutdown (the container's halt signal), waiting up to ``timeout`` seconds; it
        is never killed: ConsistencyError when it is still running then."""
        proc = self._run('lxc-stop', '--nokill', '-t', str(max(int(timeout), 1)),
                         timeout=timeout + COMMAND_TIMEOUT, check=False)
        if self.state() != STOPPED:
            raise ConsistencyError(
                f"container {self.name} did not shut down within stopwait ({timeout / 60:g} "
                f"min); it was left running and no backup was taken. Check that its init "
                f"handles lxc.signal.halt, or raise stopwait ({proc.stderr.strip()})")

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start it daemonized and wait until it is RUNNING."""
        proc = self._run('lxc-start', '-d', timeout=timeout, check=False)
        if proc.returncode != 0:
            raise ContainerError(
                f"container {self.name} did not start: {proc.stderr.strip()}; start it by hand "
                f"in the foreground to see why: lxc-start -F -P {self.lxcpath} -n {self.name}")
        self.wait_for(RUNNING, timeout)

    def wait_for(self, state: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.state() != state:
            if time.monotonic() > deadline:
                raise ContainerError(f"container {self.name} is {self.state()}, not {state}, "
                                     f"after {timeout:g} s")
            time.sleep(0.1)

    def freeze(self) -> None:
        """Freeze every process of the container (cgroup freezer)."""
        # On a cgroup v1 freezer, lxc-freeze writes FROZEN and, when its first read still says
        # FREEZING (any task of the container busy at that moment), sleeps a whole second
        # before it reads again: a second more of frozen time in a suspend backup. So the
        # freezer is set through lxc-cgroup and read every FREEZE_POLL seconds until it is
        # frozen; lxc-freeze then finds it FROZEN at once and records the state with LXC
        # (lxc-info goes by that record, not by the cgroup). Without a v1 freezer (cgroup v2)
        # lxc-cgroup fails, and lxc-freeze, which there waits on the kernel's event, does it.
        if self._run('lxc-cgroup', 'freezer.state', FROZEN, check=False).returncode == 0:
            deadline = time.monotonic() + COMMAND_TIMEOUT
            while self._freezer() == FREEZING and time.monotonic() < deadline:
                time.sleep(FREEZE_POLL)
        proc = self._run('lxc-freeze', check=False)
        state = self.state()
        if state != FROZEN:
            raise ContainerError(
                f"container {self.name} could not be frozen: it is {state} "
                f"({(proc.stderr.strip().splitlines() or ['lxc-freeze said nothing'])[-1]}); it "
                "was stopped or restarted while the backup froze it, and no backup was taken. "
                "Check who stops it, start it again if needed, and run the backup again")

    def frozen(self, state: str = '') -> bool:
        """Whether it is frozen (or freezing): by LXC's record (``state`` when already read),
        or by the v1 freezer alone, as a freeze cut short between lxc-cgroup and lxc-freeze (a
        signal, a kill) leaves it while LXC's record still says RUNNING."""
        state = state or self.state()
        return state == FROZEN or (state == RUNNING and self._freezer() in (FROZEN, FREEZING))

    def thaw(self) -> None:
        """Let a frozen container run again; a container that is not frozen is left alone."""
        state = self.state()
        if state == FROZEN:
            self._run('lxc-unfreeze')
        elif self.frozen(state):
            # lxc-unfreeze goes by LXC's record: the freezer is thawed where it was frozen
            self._run('lxc-cgroup', 'freezer.state', 'THAWED')

    def _freezer(self) -> str:
        """The v1 freezer cgroup's state (THAWED, FREEZING, FROZEN); '' where there is none
        (cgroup v2) or the container does not run."""
        proc = self._run('lxc-cgroup', 'freezer.state', check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ''
