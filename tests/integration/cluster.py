"""Several "nodes" on one machine for the multi-node test (FACTS.md: several nodes on one machine).

Each node is one sshd on 127.0.0.1N, started inside
``unshare --mount --uts --propagation private`` with overlayfs over ``/etc`` and ``/var/lib`` (its
files stay its own) and its own host name. Everything else (``/tmp``, ``/run``, ``/usr``) is shared,
so the lab guests' QMP sockets in the test's tmp dir are reachable from every node.

A login gets a clean environment, whatever the host's start-up files do (on one image root's
``.bashrc`` runs ``pyenv init``, ~0.75 s for every ssh command, so every Ansible task): the node's
``/etc/passwd`` (in its overlay) gives root a home of its own, an empty directory in the node's
dir, and ``/bin/sh`` as its shell, which reads no rc file for ``sh -c``; sshd runs no
``~/.ssh/rc`` and no ``/etc/ssh/sshrc``. Root's real home is not hidden, as a mount over it would
do: the venv's interpreter (``interpreter_python``) may live there, under pyenv.

Teardown (``Cluster.stop``) closes ansible's ControlPersist masters, kills each sshd by its pidfile
and then every process left in that node's mount namespace (its sessions), by pid; the mounts go
with the namespace's last process. Nothing is mounted in the caller's namespace.
"""
import os
import shutil
import signal
import socket
import subprocess
import time

SSHD = shutil.which('sshd') or '/usr/sbin/sshd'
# Connections reused (ControlPersist, closed with `ssh -O exit` on teardown); throwaway host keys.
SSH_ARGS = ('-o ControlMaster=auto -o ControlPersist=60s -o StrictHostKeyChecking=no '
            '-o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes')


def unavailable():
    """Why the cluster cannot run here (a skip reason), or None."""
    if os.geteuid() != 0:
        return 'needs root (unshare --mount, overlayfs mounts, sshd)'
    if shutil.which('unshare') is None:
        return 'needs unshare (util-linux)'
    probe = f'/tmp/gv-overlay-probe-{os.getpid()}'
    try:
        for sub in ('upper', 'work'):
            os.makedirs(os.path.join(probe, sub))
        proc = subprocess.run(
            ['unshare', '--mount', '--uts', '--propagation', 'private', 'sh', '-c',
             f'mount -t overlay overlay -o lowerdir=/etc,upperdir={probe}/upper,'
             f'workdir={probe}/work /etc && hostname gvprobe'],
            capture_output=True, text=True, check=False, timeout=300)
        if proc.returncode != 0:
            return f'unshare --mount --uts with overlayfs over /etc fails: {proc.stderr.strip()}'
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return None


def ensure_sshd():
    """Install openssh-server when sshd is missing (we are root here); a skip reason or None."""
    if os.path.exists(SSHD):
        return None
    proc = subprocess.run(['apt-get', 'install', '-y', 'openssh-server'],
                          capture_output=True, text=True, check=False, timeout=600,
                          env=dict(os.environ, DEBIAN_FRONTEND='noninteractive'))
    if proc.returncode != 0 or not os.path.exists(SSHD):
        return f'needs sshd: apt-get install -y openssh-server failed: {proc.stderr[-300:]}'
    return None


def free_port(addresses):
    """A TCP port free on every one of ``addresses`` now: the nodes of concurrent test runs (other
    worktrees, other users of the machine) must not meet on a fixed port."""
    for _attempt in range(50):
        with socket.socket() as first:
            first.bind((addresses[0], 0))
            port = first.getsockname()[1]
        try:
            for address in addresses[1:]:
                with socket.socket() as other:
                    other.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f'no TCP port free on all of {", ".join(addresses)}')


def _mnt_ns(pid):
    try:
        return os.readlink(f'/proc/{pid}/ns/mnt')
    except OSError:
        return None


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


class NodeProcess:
    """One node: name, address, its sshd (pidfile) and the overlay upper dirs of /etc, /var/lib."""

    def __init__(self, base, index):
        self.name = f'node{index}'
        self.address = f'127.0.0.{10 + index}'
        self.dir = os.path.join(base, self.name)
        self.upper_etc = os.path.join(self.dir, 'etc-upper')
        self.upper_varlib = os.path.join(self.dir, 'varlib-upper')
        self.pidfile = os.path.join(self.dir, 'sshd.pid')
        self.log = os.path.join(self.dir, 'sshd.log')
        self.config = os.path.join(self.dir, 'sshd_config')
        self.home = os.path.join(self.dir, 'home')
        self.port = None
        self.pid = None
        self.namespace = None

    def etc_file(self, path):
        """A file the node wrote under /etc, read from its overlay's upper dir (None: absent)."""
        full = os.path.join(self.upper_etc, path.lstrip('/').removeprefix('etc/'))
        return open(full).read() if os.path.isfile(full) else None

    def _clean_login(self):
        """Root's entry in the node's own /etc/passwd: an empty home and a shell without rc files
        (written into the overlay's upper dir before the mount, so the host's file is untouched)."""
        os.makedirs(self.home, mode=0o700, exist_ok=True)
        lines, found = [], False
        with open('/etc/passwd') as handle:
            for line in handle:
                fields = line.rstrip('\n').split(':')
                if len(fields) == 7 and fields[0] == 'root':
                    fields[5:7] = [self.home, '/bin/sh']
                    line, found = ':'.join(fields) + '\n', True
                lines.append(line)
        if not found:
            raise RuntimeError('/etc/passwd has no root entry')
        path = os.path.join(self.upper_etc, 'passwd')
        with open(path, 'w') as handle:
            handle.writelines(lines)
        os.chmod(path, 0o644)

    def start(self, host_key, authorized_keys, port):
        self.port = port
        for sub in ('etc-upper', 'etc-work', 'varlib-upper', 'varlib-work'):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        self._clean_login()
        with open(self.config, 'w') as handle:
            handle.write(f"""\
Port {port}
ListenAddress {self.address}
HostKey {host_key}
PidFile {self.pidfile}
AuthorizedKeysFile {authorized_keys}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitUserRC no
PermitUserEnvironment no
StrictModes no
UseDNS no
Subsystem sftp internal-sftp
""")
        script = (
            'set -e; '
            f'mount -t overlay overlay -o lowerdir=/etc,upperdir={self.dir}/etc-upper,'
            f'workdir={self.dir}/etc-work /etc; '
            'rm -f /etc/ssh/sshrc; '      # sshd would run it for every session
            f'mount -t overlay overlay -o lowerdir=/var/lib,upperdir={self.dir}/varlib-upper,'
            f'workdir={self.dir}/varlib-work /var/lib; '
            f'hostname {self.name}; '
            f'exec {SSHD} -f {self.config} -E {self.log}')
        proc = subprocess.run(['unshare', '--mount', '--uts', '--propagation', 'private',
                               'sh', '-c', script], capture_output=True, text=True, timeout=300,
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f'{self.name}: sshd did not start: {proc.stderr}')
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if os.path.exists(self.pidfile):
                try:
                    self.pid = int(open(self.pidfile).read().split()[0])
                except (ValueError, IndexError):
                    self.pid = None
                if self.pid:
                    self.namespace = _mnt_ns(self.pid)
                    try:
                        socket.create_connection((self.address, port), timeout=1).close()
                        return self
                    except OSError:
                        pass
            time.sleep(0.1)
        log = open(self.log).read() if os.path.exists(self.log) else ''
        raise RuntimeError(f'{self.name}: sshd not listening on {self.address}:{port}\n{log}')

    def stop(self):
        """Kill the sshd by its pidfile, then what is left in its mount namespace, by pid."""
        if self.pid is None and os.path.exists(self.pidfile):
            try:
                self.pid = int(open(self.pidfile).read().split()[0])
                self.namespace = _mnt_ns(self.pid)
            except (OSError, ValueError, IndexError):
                pass
        if self.pid and _alive(self.pid):
            os.kill(self.pid, signal.SIGTERM)
        if not self.namespace or self.namespace == _mnt_ns(os.getpid()):
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = [int(p) for p in os.listdir('/proc')
                    if p.isdigit() and _mnt_ns(p) == self.namespace]
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and any(_alive(p) for p in left):
                time.sleep(0.05)


class Cluster:
    """Three nodes, a throwaway client key, and the ansible.cfg to reach them."""

    def __init__(self, base, count=3, python='/usr/bin/python3'):
        self.base = base
        self.python = python
        self.nodes = [NodeProcess(base, i) for i in range(1, count + 1)]
        self.key = os.path.join(base, 'id_ed25519')
        self.host_key = os.path.join(base, 'ssh_host_ed25519_key')
        self.authorized_keys = os.path.join(base, 'authorized_keys')
        self.control_path_dir = os.path.join(base, 'cp')
        self.ansible_cfg = os.path.join(base, 'ansible.cfg')
        self.port = None

    def start(self):
        for path in (self.key, self.host_key):
            subprocess.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-C', 'guestvault-test',
                            '-f', path], check=True, capture_output=True)
        shutil.copy(self.key + '.pub', self.authorized_keys)
        os.chmod(self.authorized_keys, 0o600)
        for sub in ('cp', 'local-tmp', 'remote-tmp'):
            os.makedirs(os.path.join(self.base, sub), exist_ok=True)
        with open(self.ansible_cfg, 'w') as handle:
            handle.write(f"""\
[defaults]
host_key_checking = False
local_tmp = {self.base}/local-tmp
remote_tmp = {self.base}/remote-tmp
interpreter_python = {self.python}
forks = 3
gathering = implicit
gather_subset = min
retry_files_enabled = False
nocolor = True
stdout_callback = default

[ssh_connection]
control_path_dir = {self.control_path_dir}
ssh_args = {SSH_ARGS}
pipelining = True
""")
        # sshd's privilege separation directory, as openssh-server's own start-up makes it. Left
        # in place on teardown: the sshd of a concurrent run may need it for its next login.
        os.makedirs('/run/sshd', mode=0o755, exist_ok=True)
        self.port = free_port([node.address for node in self.nodes])
        for node in self.nodes:
            node.start(self.host_key, self.authorized_keys, self.port)
        return self

    def inventory(self, path, host_vars, group_vars):
        import yaml
        hosts = {node.name: dict({'ansible_host': node.address}, **host_vars.get(node.name, {}))
                 for node in self.nodes}
        data = {'all': {'children': {'kvm_nodes': {'hosts': hosts}},
                        'vars': dict({'ansible_port': self.port, 'ansible_user': 'root',
                                      'ansible_ssh_private_key_file': self.key,
                                      'ansible_become': False}, **group_vars)}}
        with open(path, 'w') as handle:
            yaml.safe_dump(data, handle, sort_keys=False)
        return path

    def stop(self):
        if os.path.isdir(self.control_path_dir):
            for sock in os.listdir(self.control_path_dir):
                path = os.path.join(self.control_path_dir, sock)
                subprocess.run(['ssh', '-o', f'ControlPath={path}', '-O', 'exit', 'localhost'],
                               capture_output=True, timeout=300,
                               check=False)
        errors = []
        for node in self.nodes:
            try:
                node.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(f'{node.name}: {exc}')
        if errors:
            raise RuntimeError('; '.join(errors))
