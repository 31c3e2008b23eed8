"""Notifications on real parts: an SMTP server on loopback (aiosmtpd, with STARTTLS, implicit TLS
under a test CA, and AUTH), Debian's msmtp as the node's sendmail relaying to it, and an HTTP
receiver for Gotify and webhooks; guestvault-dump runs that notify."""
import base64
import datetime
import email
import email.policy
import http.server
import json
import os
import socket
import ssl
import sys
import threading

import pytest

from guestvault_engine.errors import NotificationFailed
from guestvault_engine.notify.deliver import vzdump_event
from guestvault_engine.notify.targets import Target, target_for
from guestvault_engine.policy.notifications_cfg import parse_notifications_cfg
from ansible_runner import assert_failed_with
from procs import run_bounded

aiosmtpd_controller = pytest.importorskip('aiosmtpd.controller')
from aiosmtpd.smtp import AuthResult  # noqa: E402

MiB = 1 << 20
ROOT = os.path.join(os.path.dirname(__file__), '..', '..')
COMMAND = os.path.join(ROOT, 'bin', 'guestvault-dump')
USER, PASSWORD = 'backup', 'pw-s3cret-42'
TOKEN = 'gotify-t0ken-77'
GUESTS = [{'vmid': 101, 'name': 'web01', 'status': 'ok', 'time': 5, 'size': MiB,
           'filename': 'vm/101/2024-01-01T02:00:00Z'}]


def b64(text):
    return base64.b64encode(text.encode()).decode()


def free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------- the real parts

@pytest.fixture(scope='module')
def tls(tmp_path_factory):
    """A test CA and a certificate for 127.0.0.1 signed by it: (ca file, server context)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress
    directory = tmp_path_factory.mktemp('tls')
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def certificate(subject, public_key, issuer, signer, extensions):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical)
        return builder.sign(signer, hashes.SHA256())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'guestvault test CA')])
    ca = certificate(ca_name, ca_key.public_key(), ca_name, ca_key,
                     [(x509.BasicConstraints(ca=True, path_length=None), True),
                      (x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                       True)])
    cert = certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, '127.0.0.1')]),
                       key.public_key(), ca_name, ca_key,
                       [(x509.SubjectAlternativeName([x509.IPAddress(
                           ipaddress.ip_address('127.0.0.1'))]), False)])
    pem = serialization.Encoding.PEM
    (directory / 'ca.pem').write_bytes(ca.public_bytes(pem))
    (directory / 'cert.pem').write_bytes(cert.public_bytes(pem))
    (directory / 'key.pem').write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / 'cert.pem', directory / 'key.pem')
    return str(directory / 'ca.pem'), context


class Mailbox:
    """What the SMTP servers accepted: (envelope recipients, parsed message, authenticated)."""

    def __init__(self):
        self.mails = []

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        self.mails.append((sorted(envelope.rcpt_tos), message, bool(session.authenticated)))
        return '250 OK queued as test'


def authenticator(server, session, envelope, mechanism, data):
    ok = data.login == USER.encode() and data.password == PASSWORD.encode()
    # handled=False: aiosmtpd answers a refusal with 535 itself
    return AuthResult(success=ok, handled=False)


@pytest.fixture(scope='module')
def smtp(tls):
    """Two servers on one mailbox: STARTTLS (AUTH after TLS; also plain, for msmtp) and
    implicit TLS, both under the test CA."""
    _ca, context = tls
    mailbox = Mailbox()
    servers = {
        'starttls': aiosmtpd_controller.Controller(
            mailbox, hostname='127.0.0.1', port=free_port(), tls_context=context,
            authenticator=authenticator, auth_require_tls=True),
        'tls': aiosmtpd_controller.Controller(
            mailbox, hostname='127.0.0.1', port=free_port(), ssl_context=context,
            authenticator=authenticator, auth_require_tls=False),
    }
    for server in servers.values():
        server.start()
    yield mailbox, {mode: server.port for mode, server in servers.items()}
    for server in servers.values():
        server.stop()


class Receiver(http.server.BaseHTTPRequestHandler):
    def handle_one(self):
        length = int(self.headers.get('Content-Length') or 0)
        self.server.requests.append((self.command, self.path, dict(self.headers),
                                     self.rfile.read(length)))
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.end_headers()
        self.wfile.write(b'{"id": 1}')

    do_POST = do_PUT = do_GET = handle_one

    def log_message(self, *args):
        pass


@pytest.fixture(scope='module')
def http_receiver():
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Receiver)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def env(smtp, tls, tmp_path, monkeypatch):
    """msmtp (the node's /usr/sbin/sendmail) relaying to the STARTTLS server, and the test CA
    trusted: the environment of this process and of guestvault-dump."""
    _mailbox, ports = smtp
    home = tmp_path / 'home'
    home.mkdir()
    rc = home / '.msmtprc'
    rc.write_text(f"account default\nhost 127.0.0.1\nport {ports['starttls']}\nauth off\n"
                  "tls off\nsyslog off\n")
    rc.chmod(0o600)
    monkeypatch.setenv('HOME', str(home))
    monkeypatch.setenv('SSL_CERT_FILE', tls[0])
    if not os.path.exists('/usr/sbin/sendmail'):
        pytest.skip("no sendmail: apt-get install msmtp-mta (make deps)")
    return dict(os.environ, GUESTVAULT_STATE_DIR=str(tmp_path / 'state'),
                GUESTVAULT_FLEECING_DIR=str(tmp_path / 'fleecing'))


@pytest.fixture
def mails(smtp):
    mailbox, _ports = smtp
    mailbox.mails.clear()
    return mailbox.mails


WEBHOOK_BODY = b64('{"title": "{{ escape title }}", "fields": {{ json fields }}}')


def config_text(smtp_ports, http_port, password=PASSWORD):
    public = (
        "sendmail: ops\n\tmailto ops@example.com\n\tmailto sre@example.com\n"
        "\tfrom-address backup@example.com\n\n"
        f"smtp: relay\n\tserver 127.0.0.1\n\tport {smtp_ports['starttls']}\n\tmode starttls\n"
        f"\tusername {USER}\n\tmailto relay@example.com\n\tfrom-address backup@example.com\n\n"
        f"smtp: relay-tls\n\tserver 127.0.0.1\n\tport {smtp_ports['tls']}\n\tmode tls\n"
        f"\tusername {USER}\n\tmailto tls@example.com\n\tfrom-address backup@example.com\n\n"
        f"gotify: phone\n\tserver http://127.0.0.1:{http_port}\n\n"
        f"webhook: chat\n\tmethod post\n\turl http://127.0.0.1:{http_port}/hook/"
        "{{ url-encode fields.hostname }}?key={{ secrets.key }}\n"
        f"\theader name=Content-Type,value={b64('application/json')}\n"
        f"\theader name=X-Severity,value={b64('{{ severity }}')}\n"
        f"\tbody {WEBHOOK_BODY}\n"
        "\tsecret name=key\n")
    private = (f"smtp: relay\n\tpassword {password}\n\nsmtp: relay-tls\n\tpassword {password}\n\n"
               f"gotify: phone\n\ttoken {TOKEN}\n\n"
               f"webhook: chat\n\tsecret name=key,value={b64('hook-key-9')}\n")
    return public, private


def write_config(config_dir, public, private):
    with open(os.path.join(config_dir, 'notifications.cfg'), 'w') as handle:
        handle.write(public)
    os.makedirs(os.path.join(config_dir, 'priv'), mode=0o700, exist_ok=True)
    path = os.path.join(config_dir, 'priv', 'notifications.cfg')
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 'w') as handle:
        handle.write(private)


# --------------------------------------------------------------------------- the Target contract

@pytest.mark.parametrize('name', ['ops', 'relay', 'relay-tls', 'phone', 'chat'])
def test_every_target_delivers_to_its_real_server(name, env, smtp, mails, http_receiver,
                                                  tmp_path):
    public, private = config_text(smtp[1], http_receiver.server_port)
    config = parse_notifications_cfg(public, 'n.cfg', private, 'p.cfg')
    target = target_for(config.targets[name], 'root@node1')
    assert isinstance(target, Target)
    event = vzdump_event(GUESTS, 5, 'the log\n', 'node1', str(tmp_path), job_id='nightly')
    http_receiver.requests.clear()
    answer = target.send(event)
    assert answer and not any(secret in answer for secret in target.secrets)
    if name in ('ops', 'relay', 'relay-tls'):
        [(recipients, message, authenticated)] = mails
        assert recipients == sorted(config.targets[name].get('mailto'))
        assert authenticated == (name != 'ops')
        assert message['Subject'] == event.title
        assert [p.get_content_type() for p in message.iter_parts()] == ['text/plain',
                                                                        'text/html']
        assert 'web01' in message.get_body(('plain',)).get_content()
        return
    [(method, path, headers, body)] = http_receiver.requests
    if name == 'phone':
        assert (method, path) == ('POST', '/message')
        assert headers['Authorization'] == f'Bearer {TOKEN}' and headers['X-Gotify-Key'] == TOKEN
        assert headers['Content-Type'] == 'application/json'
        assert json.loads(body) == {
            'title': event.title, 'message': f"```\n{event.text}\n```", 'priority': 1,
            'extras': {'client::display': {'contentType': 'text/markdown'}}}
    else:
        assert (method, path) == ('POST', '/hook/node1?key=hook-key-9')
        assert headers['Content-Type'] == 'application/json' and headers['X-Severity'] == 'info'
        assert json.loads(body) == {'title': event.title, 'fields': {
            'type': 'vzdump', 'hostname': 'node1', 'job-id': 'nightly'}}


@pytest.mark.parametrize('name', ['relay', 'relay-tls', 'phone', 'chat'])
def test_a_target_whose_server_is_gone_raises_without_its_secret(name, env, smtp,
                                                                 http_receiver, tmp_path):
    dead = free_port()
    public, private = config_text({'starttls': dead, 'tls': dead}, dead)
    config = parse_notifications_cfg(public, 'n.cfg', private, 'p.cfg')
    target = target_for(config.targets[name], 'root@node1')
    with pytest.raises(NotificationFailed) as caught:
        target.send(vzdump_event(GUESTS, 5, '', 'node1', str(tmp_path)))
    assert f"'{name}'" in str(caught.value)
    assert not any(secret in str(caught.value) for secret in target.secrets + ('hook-key-9',))


def test_an_smtp_server_refusing_the_credentials_says_so_without_the_password(
        env, smtp, mails, tmp_path):
    public, private = config_text(smtp[1], 1, password='wrong-pw-31')
    config = parse_notifications_cfg(public, 'n.cfg', private, 'p.cfg')
    with pytest.raises(NotificationFailed) as caught:
        target_for(config.targets['relay'], 'root@node1').send(
            vzdump_event(GUESTS, 5, '', 'node1', str(tmp_path)))
    assert 'refused the credentials' in str(caught.value) and 'wrong-pw-31' not in str(
        caught.value)
    assert mails == []


def test_a_certificate_not_signed_by_a_trusted_ca_is_refused(env, smtp, monkeypatch, tmp_path):
    monkeypatch.setenv('SSL_CERT_FILE', '/nonexistent')
    public, private = config_text(smtp[1], 1)
    config = parse_notifications_cfg(public, 'n.cfg', private, 'p.cfg')
    for name in ('relay', 'relay-tls'):
        with pytest.raises(NotificationFailed, match='CERTIFICATE_VERIFY_FAILED'):
            target_for(config.targets[name], 'root@node1').send(
                vzdump_event(GUESTS, 5, '', 'node1', str(tmp_path)))


# --------------------------------------------------------------------------- runs that notify

# PVE's built-in default-matcher would also mail root: these tests name their matchers
NO_DEFAULT = "\nmatcher: default-matcher\n\ttarget mail-to-root\n\tdisable 1\n"


def dump(config_dir, env, *args):
    return run_bounded([sys.executable, COMMAND, '--config-dir', config_dir, '--node', 'node1',
                        *args], 600, capture_output=True, text=True, env=env)


def test_a_failing_job_sends_exactly_one_error_mail_to_the_matchers_targets(
        env, smtp, mails, http_receiver, config_dir, store):
    public, private = config_text(smtp[1], http_receiver.server_port)
    write_config(config_dir, public + "\nmatcher: failures\n\ttarget ops\n\tmatch-severity "
                 "error\n\tmatch-field exact:job-id=nightly\n\nmatcher: default-matcher\n"
                 "\ttarget relay\n\tdisable 1\n", private)
    with open(os.path.join(config_dir, 'jobs.cfg'), 'w') as handle:
        handle.write(f"vzdump: nightly\n\tschedule daily\n\tvmid 998,999\n\tdumpdir {store}\n")
    http_receiver.requests.clear()
    proc = dump(config_dir, env, '--job', 'nightly')
    assert proc.returncode == 1, proc.stdout + proc.stderr      # as without notifications
    [(recipients, message, _auth)] = mails
    assert recipients == ['ops@example.com', 'sre@example.com']
    assert message['Subject'].endswith('): backup failed')
    assert message['Subject'].startswith('vzdump backup status (')
    text = message.get_body(('plain',)).get_content()
    rows = [line.split() for line in text.splitlines()]
    assert ['998', 'VM', '998', 'err', '0s', '0', 'B'] in rows
    assert ['999', 'VM', '999', 'err', '0s', '0', 'B'] in rows
    assert 'VM 998' in message.get_body(('html',)).get_content()
    assert 'guestvault-dump --config-dir' in text and '--job nightly' in text    # the log
    assert http_receiver.requests == []
    assert "notification sent to target 'ops'" in proc.stdout
    state = json.loads((env_path(env) / 'nightly.json').read_text())
    assert [n['target'] for n in state['notifications']] == ['ops'] and \
        state['notifications'][0]['ok']


def env_path(env):
    import pathlib
    return pathlib.Path(env['GUESTVAULT_STATE_DIR'])


def test_mailto_on_the_command_line_is_legacy_mail_to_those_addresses_only(
        env, smtp, mails, http_receiver, config_dir, store):
    public, private = config_text(smtp[1], http_receiver.server_port)
    write_config(config_dir, public + "\nmatcher: everything\n\ttarget chat\n" + NO_DEFAULT,
                 private)
    http_receiver.requests.clear()
    proc = dump(config_dir, env, '999', '--dumpdir', store, '--mailto', 'root@example.com',
                '--mailto', 'admin@example.com,ops@example.com')
    assert proc.returncode == 1, proc.stdout + proc.stderr
    [(recipients, message, _auth)] = mails
    assert recipients == ['admin@example.com', 'ops@example.com', 'root@example.com']
    assert message['From'].startswith('vzdump backup tool <')
    assert http_receiver.requests == []          # notifications.cfg is not used
    mails.clear()
    proc = dump(config_dir, env, '999', '--dumpdir', store, '--mailto', 'root@example.com',
                '--notification-mode', 'notification-system')
    assert mails == [] and len(http_receiver.requests) == 1


def test_a_successful_run_with_match_severity_error_sends_no_mail_and_refused_smtp_only_warns(
        env, smtp, mails, http_receiver, config_dir, store, make_guest):
    guest = make_guest(disks=[('qcow2', 8 * MiB)], vmid=301)
    with open(os.path.join(config_dir, 'guests.d', '301.conf'), 'w') as handle:
        handle.write(f"name: web301\nqmp: {guest.qmp_socket}\n")
    public, private = config_text(smtp[1], http_receiver.server_port, password='wrong-pw-31')
    write_config(config_dir, public + "\nmatcher: failures\n\ttarget ops\n\tmatch-severity error\n"
                 "\nmatcher: all\n\ttarget relay\n\ttarget chat\n" + NO_DEFAULT, private)
    http_receiver.requests.clear()
    proc = dump(config_dir, env, '301', '--dumpdir', store)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert mails == []                          # ops: errors only; relay: refused
    assert "WARNING: notification to target 'relay' failed" in proc.stdout
    assert 'refused the credentials' in proc.stdout and 'wrong-pw-31' not in proc.stdout
    [(method, path, headers, body)] = http_receiver.requests
    assert headers['X-Severity'] == 'info' and 'hook-key-9' not in proc.stdout
    assert json.loads(body)['title'].endswith('): backup successful')
    assert '1 of 1 guest(s) backed up' in proc.stdout


def test_a_malformed_notifications_cfg_is_logged_and_the_run_keeps_its_result(
        env, smtp, mails, config_dir, store):
    write_config(config_dir, "matcher: m\n\ttarget nowhere\n", '')
    proc = dump(config_dir, env, '999', '--dumpdir', store)
    assert proc.returncode == 1 and mails == []
    assert "WARNING: no notification sent:" in proc.stdout
    assert "notifications.cfg line 2: target: matcher 'm' names the target 'nowhere'" in \
        proc.stdout


def test_without_notifications_cfg_pves_builtin_mails_root(env, smtp, mails, config_dir, store):
    proc = dump(config_dir, env, '999', '--dumpdir', store)
    assert proc.returncode == 1
    [(recipients, message, _auth)] = mails
    assert recipients == ['root'] and message['Subject'].endswith('): backup failed')


# --------------------------------------------------------------------------- notification_test

NOTIFICATION_TEST = 'guestvault.backup.notification_test'


def test_notification_test_sends_to_one_target_and_reports_the_answer(
        ansible, env, smtp, mails, http_receiver, config_dir):
    public, private = config_text(smtp[1], http_receiver.server_port)
    # the matchers send nothing anywhere: the test goes to the named target all the same
    write_config(config_dir, public + "\nmatcher: nothing\n\ttarget chat\n\tinvert-match 1\n"
                 + NO_DEFAULT, private)
    checked = ansible.module(NOTIFICATION_TEST, {'target': 'relay', 'config_dir': config_dir},
                             check=True)
    assert checked['_status'] == 'ok' and not checked['changed'], checked
    assert (checked['target'], checked['type'], checked['sent']) == ('relay', 'smtp', False)
    assert mails == [] and 'answer' not in checked

    sent = ansible.module(NOTIFICATION_TEST, {'target': 'relay', 'config_dir': config_dir})
    assert sent['_status'] == 'ok' and sent['sent'] and not sent['changed'], sent
    # the server's own answer to the mail (the test server's handler names a queue id)
    assert sent['answer'] == \
        '127.0.0.1 accepted the mail for relay@example.com: 250 OK queued as test'
    [(recipients, message, authenticated)] = mails
    assert recipients == ['relay@example.com'] and authenticated
    assert message['Subject'] == f'Test notification from {socket.gethostname()}'
    assert "notification target 'relay'" in message.get_body(('plain',)).get_content()

    http_receiver.requests.clear()
    hook = ansible.module(NOTIFICATION_TEST, {'target': 'chat', 'config_dir': config_dir})
    assert hook['_status'] == 'ok' and hook['answer'] == 'HTTP 200: {"id": 1}', hook
    [(method, path, headers, body)] = http_receiver.requests
    assert (method, path) == ('POST', f'/hook/{socket.gethostname()}?key=hook-key-9')
    assert json.loads(body)['fields'] == {'type': 'test', 'hostname': socket.gethostname()}
    assert 'hook-key-9' not in str(hook)


def test_notification_test_fails_on_an_unknown_target_or_a_refused_login_without_secrets(
        ansible, env, smtp, mails, config_dir):
    public, private = config_text(smtp[1], 1, password='wrong-pw-31')
    write_config(config_dir, public, private)
    unknown = ansible.module(NOTIFICATION_TEST, {'target': 'pager', 'config_dir': config_dir})
    assert_failed_with(unknown, "no notification target 'pager'",
                       'targets: mail-to-root, ops, relay, relay-tls, phone, chat')
    refused = ansible.module(NOTIFICATION_TEST, {'target': 'relay', 'config_dir': config_dir})
    assert_failed_with(refused, "test notification failed: target 'relay'",
                       'refused the credentials')
    assert 'wrong-pw-31' not in str(refused) and mails == []


# --------------------------------------------------------------------------- events of modules

def test_modules_mail_their_events_backup_verify_prune_gc(
        ansible, env, smtp, mails, config_dir, datastore_path, make_guest):
    guest = make_guest(disks=[('qcow2', 8 * MiB)], vmid=302)
    with open(os.path.join(config_dir, 'guests.d', '302.conf'), 'w') as handle:
        handle.write(f"name: web302\nqmp: {guest.qmp_socket}\n")
    with open(os.path.join(config_dir, 'storage.cfg'), 'w') as handle:
        handle.write(f"datastore: ds1\n\tpath {datastore_path}\n")
    # ops (msmtp, the node's sendmail) gets everything of this node
    write_config(config_dir, "sendmail: ops\n\tmailto ops@example.com\n\n"
                 "matcher: all\n\ttarget ops\n\tmatch-field exact:storage=ds1\n\n"
                 "matcher: backups\n\ttarget ops\n\tmatch-field exact:type=vzdump\n" + NO_DEFAULT,
                 '')
    common = {'config_dir': config_dir, 'storage': 'ds1'}
    backup = ansible.module('guestvault.backup.guest_backup', dict(common, vmid=302))
    assert backup['_status'] == 'ok' and backup['changed'], backup
    assert [n['target'] for n in backup['notifications'] if n['ok']] == ['ops'], backup
    [(recipients, message, _auth)] = mails
    assert recipients == ['ops@example.com']
    assert message['Subject'].endswith('): backup successful')
    assert 'web302' in message.get_body(('plain',)).get_content()

    mails.clear()
    verified = ansible.module('guestvault.backup.verify', dict(common, vmid=302, notify='always'))
    assert verified['_status'] == 'ok' and verified['verify_state'] == 'ok', verified
    pruned = ansible.module('guestvault.backup.prune',
                            dict(common, vmid=302, keep_last=1, notify='always'))
    assert pruned['_status'] == 'ok', pruned
    quiet = ansible.module('guestvault.backup.garbage_collect', common)     # notify: error
    assert quiet['_status'] == 'ok' and quiet['notifications'] == [], quiet
    collected = ansible.module('guestvault.backup.garbage_collect', dict(common, notify='always'))
    assert collected['_status'] == 'ok', collected
    assert [m['Subject'] for _r, m, _a in mails] == [
        "Verify Datastore 'ds1' successful", "Pruning datastore 'ds1' successful",
        "Garbage Collect Datastore 'ds1' successful"]
    assert f"Backup {backup['backup']}: ok" in mails[0][1].get_body(('plain',)).get_content()
