"""A backup job run by its systemd timer mails its outcome (issue 23), on real parts end to end.

``apply_job`` renders the job's timer and service as the backup_job module does; a real systemd 252
(``systemd_pid1``) starts the timer, the timer triggers the service, and the service runs the real
``bin/guestvault-dump``. Two targets: ``ops``, a sendmail target through Debian's msmtp (the
node's ``/usr/sbin/sendmail``), which the matcher ``failures`` (``match-severity error``) chooses;
and ``relay``, an smtp target, which the matcher ``successes`` (``match-severity info``) chooses.

The node's network namespace has a loopback of its own: a server on the host's loopback is out of
reach of the node's services. So the SMTP server (aiosmtpd, with its own ``Mailbox`` handler:
each accepted mail in a maildir, the envelope's recipients as ``X-RcptTo``) runs inside that
namespace (``nsenter --net``), as a node's local mail relay would.

Why the timer and not ``systemctl start`` of the service: the timer is what runs a job at night,
and starting it takes no calendar wait. The jobs are ``repeat-missed`` (``Persistent=true``) and
their stamps say they last ran two days ago, so starting a timer triggers its service at once,
as after a node was down (test_repeat_missed); the next scheduled time is about 12 hours away, so
no second run can mix in. The timers are started one per test, never together, so each test sees
its own run's mails only. One boot, one SMTP server and one lab guest serve both tests (a few
seconds in all). The rendered units are used as written; a drop-in beside each service adds only
this test node's environment and where the run's output goes.
"""
import email
import email.policy
import json
import os
import re
import subprocess
import sys
import time

import pytest

from guestvault_engine.run.backup_job import apply_job, unit_names
from labguest import LabGuest
from systemd_pid1 import SystemdPid1, probe

pytest.importorskip('aiosmtpd')

MiB = 1 << 20
ROOT = os.path.realpath(os.path.join(os.path.dirname(__file__), '..', '..'))
COMMAND = os.path.join(ROOT, 'bin', 'guestvault-dump')
SMTP_PORT = 25                  # the node's own loopback: nothing else listens there
RUN_TIMEOUT = 300               # seconds for a job's run (a few here); machines vary 3x in speed
START_TIMEOUT = 60              # seconds for the SMTP server to listen (about one here)
FAILING, SUCCEEDING = 'nightly-broken', 'nightly-web'
NOTIFICATIONS = """\
sendmail: ops
\tmailto ops@example.com
\tmailto sre@example.com
\tfrom-address backup@example.com

smtp: relay
\tserver 127.0.0.1
\tport {port}
\tmode insecure
\tmailto relay@example.com
\tfrom-address backup@example.com

matcher: failures
\ttarget ops
\tmatch-severity error

matcher: successes
\ttarget relay
\tmatch-severity info

matcher: default-matcher
\ttarget mail-to-root
\tdisable 1
"""


@pytest.fixture(scope='module')
def node(tmp_path_factory):
    """The booted node with both jobs installed (timers not started), its SMTP server and the lab
    guest of the successful job: a dict of what the tests need."""
    reason = probe(tmp_path_factory.mktemp('probe'), timeout=10)
    if reason:
        pytest.skip(reason)
    if not os.path.exists('/usr/sbin/sendmail'):
        pytest.skip("no sendmail: apt-get install msmtp-mta (make deps)")
    root = tmp_path_factory.mktemp('node')
    config_dir, store, maildir, home = root / 'etc', root / 'store', root / 'maildir', root / 'home'
    for path in (config_dir / 'guests.d', store, home):
        path.mkdir(parents=True)
    (config_dir / 'notifications.cfg').write_text(NOTIFICATIONS.format(port=SMTP_PORT))
    # A registered VM whose QEMU is gone: its backup fails.
    (config_dir / 'guests.d' / '998.conf').write_text(f"name: db998\nqmp: {root}/gone/qmp.sock\n")
    # msmtp, the node's sendmail, relays to the SMTP server on the node's loopback
    rc = home / '.msmtprc'
    rc.write_text(f"account default\nhost 127.0.0.1\nport {SMTP_PORT}\nauth off\ntls off\nsyslog off\n")
    rc.chmod(0o600)
    guest = LabGuest(str(root / 'guest'), disks=[('qcow2', 8 * MiB)], vmid=301, name='web301')
    systemd = SystemdPid1(root)
    server = None
    try:
        guest.start()
        (config_dir / 'guests.d' / '301.conf').write_text(f"name: web301\nqmp: {guest.qmp_socket}\n")
        node = {'systemd': systemd, 'config_dir': config_dir, 'maildir': maildir, 'root': root}
        for job_id, vmid in ((FAILING, 998), (SUCCEEDING, 301)):
            _install_job(node, job_id, vmid, store)
        systemd.start(timeout=10)
        server = _start_smtp_server(systemd, maildir)
        yield node
    finally:
        if server is not None:
            server.kill()
            server.wait(timeout=30)
        systemd.stop()
        guest.stop()


def test_a_failing_job_run_by_its_timer_sends_one_error_mail_to_its_matchers_targets(node):
    run = _run_by_timer(node, FAILING)
    # the job's exit code, as without notifications
    assert (run['service']['Result'], run['service']['ExecMainStatus']) == ('exit-code', '1'), run['log']
    assert len(run['mails']) == 1, f"one mail per run, to ops only: {_summary(run['mails'])}\n{run['log']}"
    [message] = run['mails']
    # ops's addresses (msmtp: from the To: header), not relay's: matcher 'successes' is not asked
    assert message['X-RcptTo'] == 'ops@example.com, sre@example.com'
    # PVE's subject names the node and the outcome; the guest table names the guest and its status
    assert re.fullmatch(r'vzdump backup status \(.+\): backup failed', message['Subject'])
    assert [p.get_content_type() for p in message.iter_parts()] == ['text/plain', 'text/html']
    rows = [line.split() for line in message.get_body(('plain',)).get_content().splitlines()]
    assert ['998', 'db998', 'err', '0s', '0', 'B'] in rows
    assert 'db998' in message.get_body(('html',)).get_content()
    assert "notification sent to target 'ops' (sendmail)" in run['log']
    assert [(n['target'], n['ok']) for n in run['state']['notifications']] == [('ops', True)]


def test_a_successful_job_run_by_its_timer_sends_nothing_to_the_error_matchers_targets(node):
    run = _run_by_timer(node, SUCCEEDING)
    assert (run['service']['Result'], run['service']['ExecMainStatus']) == ('success', '0'), run['log']
    assert '1 of 1 guest(s) backed up' in run['log']
    # ops (match-severity error) gets nothing; relay's one info mail shows the mail path worked
    assert [m['X-RcptTo'] for m in run['mails']] == ['relay@example.com'], run['log']
    [message] = run['mails']
    assert re.fullmatch(r'vzdump backup status \(.+\): backup successful', message['Subject'])
    assert [p.get_content_type() for p in message.iter_parts()] == ['text/plain', 'text/html']
    rows = [line.split()[:3] for line in message.get_body(('plain',)).get_content().splitlines()]
    assert ['301', 'web301', 'ok'] in rows
    assert [(n['target'], n['ok']) for n in run['state']['notifications']] == [('relay', True)]


# ----------------------------------------------------------------------------- helpers

def _install_job(node, job_id, vmid, store):
    """The job's units exactly as the backup_job module writes them, and a drop-in with what this
    test node adds: its paths (all under the test's directory, where both namespaces see them),
    the venv's python for the launcher's ``#!/usr/bin/env python``, msmtp's HOME, and the run's
    output in a file (no journald runs in this node)."""
    systemd, root = node['systemd'], node['root']
    # once a day, 12 hours from now (the node's time zone is the host's): no scheduled run mixes in
    options = {'schedule': f"{(time.localtime().tm_hour + 12) % 24:02d}:00", 'vmid': [vmid],
               'dumpdir': str(store), 'repeat-missed': True}
    result = apply_job(job_id, options, config_dir=str(node['config_dir']),
                       unit_dir=str(systemd.unit_dir), command=COMMAND, manage_systemd=False)
    assert result['changed'] and len(result['units']) == 2, result
    environment = {'PATH': f"{os.path.dirname(sys.executable)}:/usr/sbin:/usr/bin:/sbin:/bin",
                   'HOME': root / 'home', 'GUESTVAULT_STATE_DIR': root / 'state',
                   'GUESTVAULT_RUN_DIR': root / 'run', 'GUESTVAULT_FLEECING_DIR': root / 'fleecing',
                   'GUESTVAULT_WORK_DIR': root / 'work'}
    timer, service = unit_names(job_id)
    dropins = systemd.unit_dir / f"{service}.d"
    dropins.mkdir()
    (dropins / 'test-node.conf').write_text(
        '[Service]\n' + ''.join(f"Environment={k}={v}\n" for k, v in environment.items())
        + f"StandardOutput=append:{root / f'{job_id}.log'}\nStandardError=inherit\n")
    # repeat-missed: its last run was two days ago, so starting the timer runs the job at once
    systemd.plant_stamp(timer, time.time() - 2 * 86400)


def _start_smtp_server(systemd, maildir):
    """aiosmtpd in the node's network namespace, once it listens on the node's loopback."""
    server = subprocess.Popen(
        ['nsenter', '-t', str(systemd.pid), '--net', sys.executable, '-m', 'aiosmtpd', '-n',
         '-l', f"127.0.0.1:{SMTP_PORT}", '-c', 'aiosmtpd.handlers.Mailbox', str(maildir)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT
    # nsenter execs the server in place: its /proc/PID/net/tcp lists the namespace's sockets
    while not _listening(server.pid, SMTP_PORT):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            output = server.communicate()[0].decode(errors='replace')
            pytest.fail(f"aiosmtpd did not listen in the node's namespace: {output}")
        time.sleep(0.1)
    return server


def _listening(pid, port):
    try:
        with open(f"/proc/{pid}/net/tcp", encoding='ascii') as table:
            lines = table.read().splitlines()[1:]
    except FileNotFoundError:
        return False
    # local address 0100007F:<port hex>, state 0A (LISTEN)
    return any(f[1] == f"0100007F:{port:04X}" and f[3] == '0A' for f in (line.split() for line in lines))


def _run_by_timer(node, job_id):
    """Start the job's timer; once its service has ended (ExecStopPost too): the service's
    properties, the mails the SMTP server took in meanwhile (parsed), the run's output and the
    job's state file."""
    systemd, maildir = node['systemd'], node['maildir']
    timer, service = unit_names(job_id)
    before = _mail_files(maildir)
    systemd.systemctl('start', timer)
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        state = systemd.show(service, 'ActiveState', 'Result', 'ExecMainStatus',
                             'ExecMainExitTimestamp', 'TriggeredBy')
        # inactive or failed after the main process's exit: ExecStopPost has run as well
        if state['ExecMainExitTimestamp'] and state['ActiveState'] in ('inactive', 'failed'):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"{service} did not end within {RUN_TIMEOUT} s: {state}\n{systemd.log_tail()}")
        time.sleep(0.2)
    assert state['TriggeredBy'] == timer            # the timer ran it
    log_path = node['root'] / f"{job_id}.log"
    state_path = node['root'] / 'state' / f"{job_id}.json"
    return {'service': state, 'log': log_path.read_text() if log_path.exists() else '',
            'state': json.loads(state_path.read_text()) if state_path.exists() else {},
            'mails': [email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
                      for path in sorted(_mail_files(maildir) - before)]}


def _summary(mails):
    return [(message['X-RcptTo'], message['Subject']) for message in mails]


def _mail_files(maildir):
    """The maildir's delivered mails (new/: aiosmtpd's Mailbox moves each there when whole)."""
    new = maildir / 'new'
    return set(new.iterdir()) if new.exists() else set()
