"""What a notification says: the Handlebars subset with proxmox-notify's helpers, the vzdump
event of a run, its overrides, and where it goes (notification-mode, mailto)."""
import json

import pytest

from guestvault_engine.notify import handlebars
from guestvault_engine.notify.deliver import (MAX_LOG_SIZE, legacy_config, vzdump_config,
                                              vzdump_event)
from guestvault_engine.notify.handlebars import TemplateError, render
from guestvault_engine.notify.targets import Target, Webhook, mail_message
from guestvault_engine.policy.notifications_cfg import parse_notifications_cfg

GUESTS = [{'vmid': 101, 'name': 'web01', 'status': 'ok', 'time': 75, 'size': 3 * 2 ** 20,
           'filename': 'vm/101/2024-01-01T02:00:00Z'},
          {'vmid': 102, 'name': 'VM 102', 'status': 'err', 'time': 0, 'size': 0,
           'filename': None}]


def test_values_blocks_and_whitespace_control():
    data = {'a': {'b': 'x<y'}, 'items': [{'n': 1}, {'n': 2}], 'none': None, 'flag': True}
    assert render('{{a.b}}|{{{a.b}}}|{{ a.b }}', data, html_output=True) == 'x&lt;y|x<y|x&lt;y'
    assert render('{"f": {{ json a }}}', data) == '{"f": {"b":"x<y"}}'     # a brace after a tag
    assert render('{{a.b}}', data) == 'x<y'                              # plain text: as is
    assert render('{{#each items}}{{@index}}:{{this.n}}{{#unless @last}},{{/unless}}{{/each}}',
                  data) == '0:1,1:2'
    assert render('{{#if none}}yes{{else}}no{{/if}} {{#if flag}}yes{{/if}}', data) == 'no yes'
    assert render('{{#each missing}}x{{else}}empty{{/each}}', data) == 'empty'
    assert render('a  {{~a.b~}}  b{{! a comment }}', data) == 'ax<yb'
    assert render('{{#each items}}{{@root.a.b}}{{/each}}', data) == 'x<yx<y'


def test_helpers_render_as_proxmox_notify_does():
    assert render('{{duration 3725}} {{duration 60}} {{duration 0}}', {}) == '1h 2m 5s 1m 0s'
    assert render('{{human-bytes 1024}} {{human-bytes 1572864}} {{human-bytes 10}}', {}) == \
        '1 KiB 1.5 MiB 10 B'
    values = {'x': {'a': [1, 'b']}, 's': 'a b\n"c"/?'}
    assert render('{{json x}}|{{escape s}}|{{url-encode s}}', values) == \
        '{"a":[1,"b"]}|a b\\n\\"c\\"/?|a%20b%0A"c"%2F%3F'
    assert render('{{relative-percentage 1 4}}', {}) == '25.00%'
    assert len(render('{{timestamp 0}}', {})) == len('1970-01-01 00:00:00')


@pytest.mark.parametrize('template, words', [
    ('{{#each x}}', 'never closed'), ('{{/if}}', 'closes no open'),
    ('{{#with x}}{{/with}}', "'{{#with}}' is not supported"),
    ('{{frobnicate x}}', "unknown helper 'frobnicate'"),
])
def test_a_broken_template_is_a_template_error_that_says_what(template, words):
    with pytest.raises(TemplateError, match=words):
        render(template, {'x': 1}, name='t.hbs')


def test_the_vzdump_event_names_each_guest_with_its_status_and_cuts_long_logs(tmp_path):
    event = vzdump_event(GUESTS, 3725, 'log line\n', 'node1', str(tmp_path), job_id='nightly')
    assert event.severity == 'error'
    assert event.fields == {'type': 'vzdump', 'hostname': 'node1', 'job-id': 'nightly'}
    assert event.title.startswith('vzdump backup status (') and \
        event.title.endswith('): backup failed')
    rows = [line.split() for line in event.text.splitlines()]
    assert ['VMID', 'Name', 'Status', 'Time', 'Size', 'Filename'] in rows
    assert ['101', 'web01', 'ok', '1m', '15s', '3', 'MiB', 'vm/101/2024-01-01T02:00:00Z'] in rows
    assert ['102', 'VM', '102', 'err', '0s', '0', 'B'] in rows
    assert 'Total time: 1h 2m 5s' in event.text and 'Total size: 3 MiB' in event.text
    assert 'log line' in event.text
    assert '<td style="border: 1px solid; border-collapse: collapse; padding: 2px 6px">web01' \
        in event.html
    ok = vzdump_event(GUESTS[:1], 5, 'x' * (MAX_LOG_SIZE + 1), 'node1', str(tmp_path))
    assert ok.severity == 'info' and ok.title.endswith(': backup successful')
    assert 'x' * 100 not in ok.text and 'too long' in ok.text
    assert 'job-id' not in ok.fields
    one = vzdump_event(GUESTS[:1], 5, '', 'node1', str(tmp_path), error='storage is gone')
    assert one.title.endswith(': backup failed: storage is gone')


def test_an_admins_pve_style_override_wins_and_a_broken_one_falls_back(tmp_path):
    overrides = tmp_path / 'notification-templates' / 'default'
    overrides.mkdir(parents=True)
    (overrides / 'vzdump-subject.txt.hbs').write_text('[{{hostname}}] {{status-text}}\n')
    (overrides / 'vzdump-body.html.hbs').write_text(
        '<ul>{{#each guest-table.data}}<li>{{this.vmid}} {{this.name}} {{this.status}} '
        '{{duration this.time}} {{human-bytes this.size}}</li>{{/each}}</ul>')
    (overrides / 'vzdump-body.txt.hbs').write_text('{{#each x}}')
    logged = []
    event = vzdump_event(GUESTS, 80, '', 'node1', str(tmp_path), log=logged.append)
    assert event.title == '[node1] backup failed'
    assert event.html == '<ul><li>101 web01 ok 1m 15s 3 MiB</li><li>102 VM 102 err 0s 0 B</li></ul>'
    assert 'web01' in event.text and any('vzdump-body.txt.hbs cannot be rendered' in m
                                         for m in logged)


def test_notification_mode_and_mailto_decide_as_pves_vzdump(tmp_path):
    (tmp_path / 'notifications.cfg').write_text('sendmail: ops\n\tmailto ops@example.com\n')
    declared = vzdump_config('auto', [], 'always', False, str(tmp_path))
    assert 'ops' in declared.targets
    legacy = vzdump_config('auto', ['a@x', 'b@x'], 'always', False, str(tmp_path))
    assert list(legacy.targets) == ['<a@x,b@x>']
    assert legacy.targets['<a@x,b@x>'].get('mailto') == ['a@x', 'b@x']
    assert vzdump_config('auto', ['a@x'], 'failure', False, str(tmp_path)) is None
    assert vzdump_config('auto', ['a@x'], 'failure', True, str(tmp_path)) is not None
    assert vzdump_config('legacy-sendmail', [], 'always', True, str(tmp_path)) is None
    assert 'ops' in vzdump_config('notification-system', ['a@x'], 'always', False,
                                  str(tmp_path)).targets
    assert list(legacy_config(['r']).matchers.values())[0].get('target') == ['<r>']


def test_a_mail_is_multipart_text_and_html(tmp_path):
    event = vzdump_event(GUESTS, 5, '', 'node1', str(tmp_path))
    message = mail_message(event, 'backup@example.com', 'Backups', ['a@x', 'b@x'])
    assert message.get_content_type() == 'multipart/alternative'
    assert [part.get_content_type() for part in message.iter_parts()] == \
        ['text/plain', 'text/html']
    assert message['From'] == 'Backups <backup@example.com>' and message['To'] == 'a@x, b@x'


def test_a_webhook_request_is_templated_with_fields_and_secrets(tmp_path):
    import base64

    def b64(text):
        return base64.b64encode(text.encode()).decode()
    body = b64('{"t": "{{ escape title }}", "f": {{ json fields }}}')
    config = parse_notifications_cfg(
        f"webhook: hook\n\tmethod put\n\turl http://h/x/{{{{ url-encode fields.hostname }}}}\n"
        f"\theader name=Authorization,value={b64('Bearer {{ secrets.token }}')}\n"
        f"\tbody {body}\n"
        "\tsecret name=token\n", 'n.cfg',
        f"webhook: hook\n\tsecret name=token,value={b64('tok en')}\n", 'p.cfg')
    event = vzdump_event(GUESTS, 5, '', 'node 1', str(tmp_path))
    target = Webhook(config.targets['hook'])
    assert isinstance(target, Target) and target.secrets == ('tok en',)
    method, url, headers, body = target.request(event)
    assert (method, url, headers) == ('PUT', 'http://h/x/node%201',
                                      {'Authorization': 'Bearer tok en'})
    assert json.loads(body) == {'t': event.title, 'f': event.fields}


def test_every_target_kind_has_the_target_protocols_members():
    # the Protocol's members, checked on each class (the integration tier sends through each)
    from guestvault_engine.notify import targets
    for cls in (targets.Sendmail, targets.Smtp, targets.Gotify, targets.Webhook):
        assert callable(getattr(cls, 'send')), cls
    assert handlebars.as_text(2.0) == '2'
