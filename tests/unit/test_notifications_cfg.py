"""notifications.cfg and priv/notifications.cfg in PVE's syntax, and matchers evaluated as
proxmox-notify evaluates them."""
import base64
from datetime import datetime, timezone

import pytest

from guestvault_engine.errors import ConfigError
from guestvault_engine.policy.calendar import DailyDuration
from guestvault_engine.policy.notifications_cfg import (
    decode_base64, load_notifications, parse_notifications_cfg, render_notifications_cfg)
from guestvault_engine.policy.notify_match import matched_targets


def b64(text):
    return base64.b64encode(text.encode()).decode()


PUBLIC = f"""sendmail: admins
\tmailto admin@example.com
\tmailto ops@example.com
\tmailto-user root@pam
\tfrom-address backup@example.com
\tauthor Backups
\tcomment the admins

smtp: relay
\tserver mail.example.com
\tport 2525
\tmode starttls
\tusername backup
\tmailto admin@example.com
\tfrom-address backup@example.com

gotify: phone
\tserver https://gotify.example.com
\tdisable 1

webhook: chat
\tmethod post
\turl https://chat.example.com/hook/{{{{ secrets.token }}}}
\theader name=Content-Type,value={b64('application/json')}
\tbody {b64('{"text": "{{ escape title }}"}')}
\tsecret name=token

matcher: failures
\ttarget admins
\ttarget relay
\tmatch-severity error,warning
\tmatch-field exact:type=vzdump,gc
\tmatch-field regex:hostname=^node[0-9]+$
\tmatch-calendar mon..fri 8-17:30
\tmode any
\tinvert-match 0
\tcomment failures to the admins
"""
PRIVATE = f"""smtp: relay
\tpassword s3cret

gotify: phone
\ttoken AbCdEf

webhook: chat
\tsecret name=token,value={b64('hook-token')}
"""


def parse(public, private='', path='/etc/guestvault/notifications.cfg'):
    return parse_notifications_cfg(public, path, private, '/etc/guestvault/priv/notifications.cfg')


def test_every_type_and_key_is_read_with_the_secrets_from_the_private_file():
    config = parse(PUBLIC, PRIVATE)
    assert list(config.targets) == ['mail-to-root', 'admins', 'relay', 'phone', 'chat']
    admins = config.targets['admins']
    assert admins.get('mailto') == ['admin@example.com', 'ops@example.com']
    assert admins.get('mailto-user') == ['root@pam'] and admins.get('author') == 'Backups'
    relay = config.targets['relay']
    assert (relay.get('port'), relay.get('mode'), relay.secrets) == \
        (2525, 'starttls', {'password': 's3cret'})
    assert config.targets['phone'].disabled and config.targets['phone'].secrets == \
        {'token': 'AbCdEf'}
    chat = config.targets['chat']
    assert decode_base64(chat.get('body'), 'body') == '{"text": "{{ escape title }}"}'
    assert chat.secrets['secret'] == [{'name': 'token', 'value': b64('hook-token')}]
    failures = config.matchers['failures']
    assert failures.get('target') == ['admins', 'relay'] and failures.get('mode') == 'any'
    assert failures.get('match-severity') == [['error', 'warning']]
    assert [str(f) for f in failures.get('match-field')] == \
        ['exact:type=vzdump,gc', 'regex:hostname=^node[0-9]+$']
    assert failures.get('match-calendar')[0].start == (8, 0)


def test_rendering_gives_back_the_same_files_and_keeps_secrets_out_of_the_public_one():
    config = parse(PUBLIC, PRIVATE)
    public, private = render_notifications_cfg(config)
    assert public == PUBLIC
    assert private == PRIVATE
    assert 's3cret' not in public and 'AbCdEf' not in public and b64('hook-token') not in public
    again = parse(public, private)
    assert render_notifications_cfg(again) == (public, private)


def test_the_builtins_are_there_and_a_section_of_the_same_name_replaces_them():
    config = parse('')
    assert config.targets['mail-to-root'].get('mailto-user') == ['root@pam']
    assert config.matchers['default-matcher'].get('target') == ['mail-to-root']
    assert render_notifications_cfg(config) == ('', '')
    config = parse("matcher: default-matcher\n\ttarget mail-to-root\n\tdisable 1\n")
    assert config.matchers['default-matcher'].disabled
    assert not config.matchers['default-matcher'].builtin
    assert render_notifications_cfg(config)[0].startswith('matcher: default-matcher\n')


def test_load_reads_both_files_of_the_config_dir(tmp_path):
    (tmp_path / 'priv').mkdir()
    (tmp_path / 'notifications.cfg').write_text(PUBLIC)
    (tmp_path / 'priv' / 'notifications.cfg').write_text(PRIVATE)
    assert load_notifications(str(tmp_path)).targets['relay'].secrets == {'password': 's3cret'}
    assert list(load_notifications(str(tmp_path / 'none')).targets) == ['mail-to-root']


@pytest.mark.parametrize('text, line, words', [
    ("pushover: x\n\tserver a\n", 1, ["unknown type 'pushover'", 'sendmail, smtp']),
    ("matcher: m\n\ttarget mail-to-root\n\ttarget nowhere\n", 3,
     ["target: matcher 'm' names the target 'nowhere'", 'known targets: mail-to-root']),
    ("matcher: m\n\tmatch-field regex:type=(unclosed\n", 2,
     ["match-field: '(unclosed' is not a valid regular expression"]),
    ("matcher: m\n\tmatch-field type=vzdump\n", 2,
     ["match-field: 'type=vzdump' is not 'exact:FIELD=VALUE"]),
    ("matcher: m\n\tmatch-calendar someday 8-9\n", 2,
     ["match-calendar: invalid daily duration 'someday 8-9'"]),
    ("matcher: m\n\tmatch-calendar 18-8\n", 2, ['ends before it starts']),
    ("matcher: m\n\tmode most\n", 2, ["mode: 'most' is not allowed; use one of all, any"]),
    ("matcher: m\n\tmatch-severity fatal\n", 2, ["unknown severity 'fatal'"]),
    ("smtp: s\n\tserver a\n\tfrom-address a@b\n\tport 70000\n", 4,
     ['port: 70000 is too large, the maximum is 65535']),
    ("smtp: s\n\tserver a\n\tfrom-address a@b\n\tmode ssl\n", 4, ["mode: 'ssl' is not allowed"]),
    ("smtp: s\n\tserver a\n\tfrom-address a@b\n\tpassword x\n", 4,
     ["unknown key 'password'", 'belongs in priv/notifications.cfg']),
    ("smtp: s\n\tfrom-address a@b\n", 1, ["smtp 's' needs 'server'"]),
    ("gotify: g\n\tserver a\n", 1, ["needs 'token' in"]),
    ("webhook: w\n\turl http://x\n\tbody not-base64!\n", 3, ['body: not base64']),
    ("webhook: w\n\turl http://x\n\tsecret name=t,value=eA==\n", 3,
     ["the value of secret 't' belongs in"]),
    ("sendmail: a\n\tmailto x@y\n\nmatcher: a\n", 4, ["the name 'a' is used a second time"]),
    ("sendmail: -bad\n\tmailto x@y\n", 1, ["'-bad' is not a valid name"]),
])
def test_bad_input_names_the_file_the_line_and_the_key(text, line, words):
    with pytest.raises(ConfigError) as caught:
        parse(text)
    message = str(caught.value)
    assert message.startswith(f"/etc/guestvault/notifications.cfg line {line}:"), message
    for word in words:
        assert word in message, message


def test_a_secret_whose_target_is_missing_names_the_private_file_and_its_line():
    with pytest.raises(ConfigError, match=r"priv/notifications.cfg line 1: smtp 'relay' is "
                                          r"not in notifications.cfg"):
        parse('', "smtp: relay\n\tpassword x\n")


# --------------------------------------------------------------------------- matching

WHEN = datetime(2024, 1, 1, 9, 0, tzinfo=timezone.utc)        # a Monday


def targets(matchers_text, severity='error', fields=None, when=WHEN):
    config = parse("sendmail: a\n\tmailto a@x\n\nsendmail: b\n\tmailto b@x\n\n" + matchers_text
                   + "\nmatcher: default-matcher\n\tdisable 1\n")
    return matched_targets(config.matchers.values(), severity,
                           fields or {'type': 'vzdump', 'hostname': 'node1'}, when, 'UTC')


def test_a_matcher_without_directive_matches_everything_even_inverted():
    assert targets("matcher: m\n\ttarget a\n") == ['a']
    assert targets("matcher: m\n\ttarget a\n\tinvert-match 1\n") == ['a']


def test_mode_all_needs_every_directive_and_mode_any_one_of_them():
    both = "\tmatch-severity error\n\tmatch-field exact:type=gc\n"
    assert targets("matcher: m\n\ttarget a\n" + both) == []
    assert targets("matcher: m\n\ttarget a\n\tmode any\n" + both) == ['a']
    # within one kind too: two field lines under all must both hold
    fields = "\tmatch-field exact:type=vzdump\n\tmatch-field exact:hostname=other\n"
    assert targets("matcher: m\n\ttarget a\n" + fields) == []
    assert targets("matcher: m\n\ttarget a\n\tmode any\n" + fields) == ['a']


def test_severity_field_and_calendar_directives():
    assert targets("matcher: m\n\ttarget a\n\tmatch-severity error\n", severity='info') == []
    assert targets("matcher: m\n\ttarget a\n\tmatch-severity info,error\n", 'info') == ['a']
    assert targets("matcher: m\n\ttarget a\n\tmatch-field regex:hostname=^node\\d$\n") == ['a']
    assert targets("matcher: m\n\ttarget a\n\tmatch-field exact:job-id=nightly\n") == []
    assert targets("matcher: m\n\ttarget a\n\tmatch-calendar mon 8-10\n") == ['a']
    assert targets("matcher: m\n\ttarget a\n\tmatch-calendar sat,sun 0-23:59\n") == []


def test_invert_match_flips_a_matcher_with_directives():
    matcher = "matcher: m\n\ttarget a\n\tmatch-severity error\n\tinvert-match 1\n"
    assert targets(matcher, severity='error') == []
    assert targets(matcher, severity='info') == ['a']


def test_each_target_once_per_event_and_disabled_matchers_skipped():
    text = ("matcher: m1\n\ttarget b\n\ttarget a\n\nmatcher: m2\n\ttarget a\n\ttarget b\n\n"
            "matcher: m3\n\ttarget a\n\tdisable 1\n")
    assert targets(text) == ['b', 'a']
    assert targets("matcher: m3\n\ttarget a\n\tdisable 1\n") == []


def test_daily_duration_is_proxmox_times():
    duration = DailyDuration.parse('mon..fri 8-17:30')
    assert duration.matches(datetime(2024, 1, 5, 17, 29, tzinfo=timezone.utc), 'UTC')
    assert not duration.matches(datetime(2024, 1, 5, 17, 30, tzinfo=timezone.utc), 'UTC')
    assert not duration.matches(datetime(2024, 1, 6, 9, 0, tzinfo=timezone.utc), 'UTC')
    assert DailyDuration.parse('22:00 - 23:59').start == (22, 0)
    for bad in ('8', 'mon', '25-26', '8-9 x', ''):
        with pytest.raises(ConfigError, match='invalid daily duration'):
            DailyDuration.parse(bad)
