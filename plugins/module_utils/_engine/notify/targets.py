"""Notification targets: how an :class:`~.event.Event` reaches sendmail, an SMTP server, Gotify
or a webhook, as proxmox-notify's endpoints send it.

Every target is a :class:`Target`: ``name``, ``secrets`` (the values no message may show) and
``send(event)``, which returns what the other side answered or raises
:class:`~..errors.NotificationFailed` saying why. ``target_for`` builds one from its
notifications.cfg entry.
"""
from __future__ import annotations

import json
import smtplib
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from email.message import EmailMessage
from email.utils import formataddr, formatdate, make_msgid
from typing import List, Protocol, Tuple, runtime_checkable

from ..errors import NotificationFailed
from ..paths import sendmail_binary
from ..policy.notifications_cfg import SMTP_DEFAULT_PORTS, decode_base64
from .event import Event
from .handlebars import TemplateError, render

# Generous: a slow relay on a busy node must not lose a mail; a dead one must not hang the run.
TIMEOUT = 60
# proxmox-notify's Gotify priorities per severity.
GOTIFY_PRIORITY = {'info': 1, 'notice': 3, 'warning': 5, 'error': 9, 'unknown': 3}
DEFAULT_AUTHOR = 'guestvault'


@runtime_checkable
class Target(Protocol):
    """One notification target. ``send`` returns the other side's answer as one line of text,
    or raises NotificationFailed; no message of it contains a value of ``secrets``."""

    name: str
    secrets: Tuple[str, ...]

    def send(self, event: Event) -> str: ...


def _recipients(entry) -> List[str]:
    """``mailto`` addresses, then ``mailto-user`` users. A node has no PVE user database, so a
    user ``name@realm`` is the local mailbox ``name`` (``root@pam``: root's mail)."""
    users = [user.split('@', 1)[0] for user in entry.get('mailto-user', [])]
    return list(dict.fromkeys(entry.get('mailto', []) + users))


def mail_message(event: Event, sender: str, author: str, recipients: List[str]) -> EmailMessage:
    """The mail of an event: text and HTML as multipart/alternative."""
    message = EmailMessage()
    message['Subject'] = event.title
    message['From'] = formataddr((author, sender))
    message['To'] = ', '.join(recipients)
    message['Date'] = formatdate(event.timestamp, localtime=True)
    message['Message-ID'] = make_msgid(domain=sender.rpartition('@')[2] or None)
    message['Auto-Submitted'] = 'auto-generated'
    message.set_content(event.text)
    message.add_alternative(event.html, subtype='html')
    return message


class _Mail:
    def __init__(self, entry, default_from):
        self.name = entry.name
        self.recipients = _recipients(entry)
        self.sender = entry.get('from-address') or default_from
        self.author = entry.get('author') or DEFAULT_AUTHOR
        if not self.recipients:
            raise NotificationFailed(f"target '{self.name}' has no recipient; give it mailto "
                                     "or mailto-user")

    def message(self, event):
        return mail_message(event, self.sender, self.author, self.recipients)


class Sendmail(_Mail):
    """The node's ``sendmail`` (``-t -oi -f <from>``): recipients from the To: header, the
    message on standard input, so argv holds addresses only."""

    secrets: Tuple[str, ...] = ()

    def send(self, event):
        command = [sendmail_binary(), '-t', '-oi', '-f', self.sender]
        try:
            proc = subprocess.run(command, input=self.message(event).as_bytes(),
                                  capture_output=True, timeout=TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NotificationFailed(f"target '{self.name}': {command[0]} could not run ({exc}); "
                                     "install an MTA (e.g. 'apt-get install msmtp-mta')") from None
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).decode(errors='replace').strip()[-500:]
            raise NotificationFailed(f"target '{self.name}': {command[0]} exited with "
                                     f"{proc.returncode}: {tail}")
        return f"{command[0]} accepted the mail for {', '.join(self.recipients)}"


class Smtp(_Mail):
    """An SMTP server: ``tls`` (implicit TLS, default port 465), ``starttls`` (587) or
    ``insecure`` (25), certificates checked against the system's CAs, AUTH with ``username``
    and the password of priv/notifications.cfg."""

    def __init__(self, entry, default_from):
        super().__init__(entry, default_from)
        self.server = entry.get('server')
        self.mode = entry.get('mode', 'tls')
        self.port = entry.get('port') or SMTP_DEFAULT_PORTS[self.mode]
        self.username = entry.get('username')
        self.password = entry.secrets.get('password')
        self.secrets = tuple(s for s in (self.password,) if s)

    def send(self, event):
        where = f"target '{self.name}' (smtp {self.server}:{self.port}, {self.mode})"
        context = ssl.create_default_context()
        try:
            if self.mode == 'tls':
                client = smtplib.SMTP_SSL(self.server, self.port, timeout=TIMEOUT,
                                          context=context)
            else:
                client = smtplib.SMTP(self.server, self.port, timeout=TIMEOUT)
            with client:
                if self.mode == 'starttls':
                    client.starttls(context=context)
                if self.username:
                    client.login(self.username, self.password or '')
                # what the server said to the mail itself (its queue id, most often), which
                # send_message does not return: the test button shows it
                data_replies = []
                send_data = client.data
                client.data = lambda msg: data_replies.append(send_data(msg)) or data_replies[-1]
                refused = client.send_message(self.message(event))
        except smtplib.SMTPAuthenticationError as exc:
            raise NotificationFailed(f"{where}: the server refused the credentials of "
                                     f"'{self.username}' ({_smtp_reply(exc)}); check username "
                                     "and password in priv/notifications.cfg") from None
        except (smtplib.SMTPException, OSError, ssl.SSLError) as exc:
            raise NotificationFailed(f"{where}: {_smtp_reply(exc)}") from None
        if refused:
            raise NotificationFailed(f"{where}: the server refused {', '.join(refused)}")
        reply = ''
        if data_replies:
            code, text = data_replies[-1]
            reply = f": {code} {text.decode(errors='replace')}"
        return f"{self.server} accepted the mail for {', '.join(self.recipients)}{reply}"


def _smtp_reply(exc):
    if isinstance(exc, smtplib.SMTPResponseException):
        return f"{exc.smtp_code} {exc.smtp_error.decode(errors='replace')}"
    return f"{type(exc).__name__}: {exc}"


# proxies from the environment, as any urllib client; redirects followed as urllib does
_OPENER = urllib.request.build_opener()


def _http(name, url, method, body, headers):
    """One HTTP request; the answer's status and the start of its body."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        # the engine imports no Ansible, so not ansible's open_url; an opener of our own
        with _OPENER.open(request, timeout=TIMEOUT) as response:
            return f"HTTP {response.status}: {response.read(500).decode(errors='replace')}"
    except urllib.error.HTTPError as exc:
        detail = exc.read(500).decode(errors='replace')
        raise NotificationFailed(f"target '{name}': {method} {_strip_query(url)} answered "
                                 f"HTTP {exc.code} {exc.reason}: {detail}") from None
    except (urllib.error.URLError, OSError, ValueError, socket.timeout) as exc:
        raise NotificationFailed(f"target '{name}': {method} {_strip_query(url)} failed: "
                                 f"{getattr(exc, 'reason', exc)}") from None


def _strip_query(url):
    """A URL for messages: its query may hold a token."""
    return url.split('?', 1)[0]


class Gotify:
    """A Gotify server: ``POST <server>/message`` with the token in the headers, the body in a
    Markdown code block, the severity as Gotify's priority."""

    def __init__(self, entry):
        self.name = entry.name
        self.server = entry.get('server').rstrip('/')
        self.token = entry.secrets.get('token', '')
        self.secrets = (self.token,)

    def send(self, event):
        body = json.dumps({
            'title': event.title,
            'message': f"```\n{event.text}\n```",
            'priority': GOTIFY_PRIORITY.get(event.severity, 3),
            'extras': {'client::display': {'contentType': 'text/markdown'}},
        }).encode()
        headers = {'Content-Type': 'application/json', 'Authorization': f"Bearer {self.token}",
                   'X-Gotify-Key': self.token}
        return _http(self.name, f"{self.server}/message", 'POST', body, headers)


class Webhook:
    """Any HTTP endpoint: ``url``, each ``header`` value and the ``body`` are Handlebars
    templates over ``title``, ``message``, ``severity``, ``timestamp``, ``fields`` and
    ``secrets`` (priv/notifications.cfg), as proxmox-notify renders them."""

    def __init__(self, entry):
        self.name = entry.name
        self.entry = entry
        self.secret_values = {s['name']: decode_base64(s.get('value', ''), f"secret {s['name']}")
                              for s in entry.secrets.get('secret', [])}
        self.secrets = tuple(v for v in self.secret_values.values() if v)

    def request(self, event):
        """(method, url, headers, body) of the event's request."""
        data = {'title': event.title, 'message': event.text, 'severity': event.severity,
                'timestamp': int(event.timestamp), 'fields': dict(event.fields),
                'secrets': self.secret_values}
        entry = self.entry

        def fill(template, what):
            try:
                return render(template, data, name=f"{what} of webhook '{self.name}'")
            except TemplateError as exc:
                raise NotificationFailed(str(exc)) from None
        body = fill(decode_base64(entry.get('body', ''), 'body'), 'body')
        headers = {h['name']: fill(decode_base64(h.get('value', ''), f"header {h['name']}"),
                                   f"header {h['name']}")
                   for h in entry.get('header', [])}
        return entry.get('method', 'post').upper(), fill(entry.get('url'), 'url'), headers, body

    def send(self, event):
        method, url, headers, body = self.request(event)
        return _http(self.name, url, method, body.encode() if method != 'GET' or body else None,
                     headers)


def target_for(entry, default_from: str) -> Target:
    """The target of a notifications.cfg entry."""
    if entry.type == 'sendmail':
        return Sendmail(entry, default_from)
    if entry.type == 'smtp':
        return Smtp(entry, default_from)
    if entry.type == 'gotify':
        return Gotify(entry)
    return Webhook(entry)
