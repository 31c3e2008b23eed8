"""Writing vzdump.conf and storage.cfg: render is the parsers' inverse, output is stable, and
the node_config engine validates with the parsers before it writes anything."""
import base64
import os
import stat

import pytest

from guestvault_engine.policy.config import (
    VZDUMP_OPTIONS,
    StorageConfig,
    parse_storage_cfg,
    parse_vzdump_conf,
    render_storage_cfg,
    render_vzdump_conf,
)
from guestvault_engine.errors import ConfigError
from guestvault_engine.policy.notifications_cfg import decode_base64, load_notifications
from guestvault_engine.run.node_config import apply_node_config

# One text per vzdump.conf option (every key the parser knows), in Proxmox's own spellings.
VZDUMP_SAMPLES = {
    "bwlimit": "102400",
    "compress": "zstd",
    "dumpdir": "/srv/backup",
    "exclude-path": "'/tmp/a b' /var/cache/*",
    "fleecing": "1,storage=fast",
    "ionice": "7",
    "lockwait": "180",
    "mailnotification": "failure",
    "mailto": "root@localhost, ops@example.com;x@y",
    "mode": "suspend",
    "notes-template": "{{guestname}} on {{node}}\\nsecond line",
    "notification-mode": "legacy-sendmail",
    "performance": "max-workers=16,pbs-entries-max=1000",
    "pigz": "0",
    "protected": "yes",
    "prune-backups": "keep-daily=13,keep-last=3,keep-weekly=0",
    "remove": "off",
    "script": "/usr/local/bin/hook",
    "stdexcludes": "true",
    "stopwait": "10",
    "storage": "backup-nfs",
    "tmpdir": "/var/tmp",
    "zstd": "2",
}


def test_every_vzdump_option_has_a_round_trip_sample():
    assert set(VZDUMP_SAMPLES) == set(VZDUMP_OPTIONS)


@pytest.mark.parametrize("key", sorted(VZDUMP_SAMPLES))
def test_each_vzdump_option_reads_back_as_parsed(key):
    parsed = parse_vzdump_conf(f"{key}: {VZDUMP_SAMPLES[key]}\n", "in")
    assert parse_vzdump_conf(render_vzdump_conf(parsed), "out") == parsed


def test_a_whole_vzdump_conf_reads_back_and_renders_again_to_the_same_text():
    text = "".join(f"{key}: {value}\n" for key, value in VZDUMP_SAMPLES.items())
    parsed = parse_vzdump_conf(text, "in")
    rendered = render_vzdump_conf(parsed)
    assert parse_vzdump_conf(rendered, "out") == parsed
    assert render_vzdump_conf(parse_vzdump_conf(rendered, "again")) == rendered


def test_property_strings_are_written_in_proxmox_syntax_in_schema_order():
    text = render_vzdump_conf({"prune-backups": {"keep-daily": 13, "keep-last": 3},
                               "performance": {"max-workers": 16}, "protected": True,
                               "remove": False, "bwlimit": 0})
    assert text == ("bwlimit: 0\nperformance: max-workers=16\nprotected: 1\n"
                    "prune-backups: keep-last=3,keep-daily=13\nremove: 0\n")


def test_vzdump_keys_are_sorted_whatever_the_input_order():
    options = {"mode": "stop", "bwlimit": 5, "compress": "zstd"}
    assert render_vzdump_conf(options) == render_vzdump_conf(dict(reversed(options.items())))
    assert render_vzdump_conf(options) == "bwlimit: 5\ncompress: zstd\nmode: stop\n"


def test_lists_are_one_exclude_path_line_each_and_one_mailto_line():
    text = render_vzdump_conf({"exclude-path": ["/tmp/a b", "/var/cache/*"],
                               "mailto": ["a@b", "c@d"]})
    assert text == "exclude-path: '/tmp/a b'\nexclude-path: '/var/cache/*'\nmailto: a@b,c@d\n"
    assert parse_vzdump_conf(text, "x") == {"exclude-path": ["/tmp/a b", "/var/cache/*"],
                                            "mailto": ["a@b", "c@d"]}


def test_empty_property_strings_and_lists_read_back_empty():
    for parsed in ({"performance": {}}, {"fleecing": {}}, {"mailto": []}):
        assert parse_vzdump_conf(render_vzdump_conf(parsed), "x") == parsed


def test_keep_all_reads_back():
    parsed = parse_vzdump_conf("prune-backups: keep-all=1\n", "x")
    assert parse_vzdump_conf(render_vzdump_conf(parsed), "y") == parsed == {
        "prune-backups": {"keep-all": True}}


def test_an_empty_vzdump_conf_is_empty_text():
    assert render_vzdump_conf({}) == ""


def test_render_refuses_what_the_file_could_not_hold():
    with pytest.raises(ConfigError, match="unknown option 'nope'"):
        render_vzdump_conf({"nope": 1})
    with pytest.raises(ConfigError, match="mode: the value must be one line"):
        render_vzdump_conf({"mode": "stop\nbwlimit: 1"})
    with pytest.raises(ConfigError, match="prune-backups: unknown key 'keep-often'"):
        render_vzdump_conf({"prune-backups": {"keep-often": 1}})
    with pytest.raises(ConfigError, match="cannot write a dict"):
        render_vzdump_conf({"mode": {"a": 1}})


STORAGE_CFG = """\
# node storages
dir: local
\tpath /var/lib/vz/
\tcontent iso,vztmpl,backup
\tprune-backups keep-last=3,keep-daily=0
\tshared yes
\tdisable
\tmax-protected-backups -1

nfs: backup-nfs
\tpath /mnt/pve/backup-nfs
\tserver 10.0.0.5
\texport /export/backup
\toptions vers=4.2
\tnodes node1 node2
\tcontent backup

cifs: smb
\tpath /mnt/pve/smb
\tserver nas
\tshare backups
\tusername backup
\tcreate-base-path 0
\tis_mountpoint yes
"""


def test_storage_cfg_reads_back_as_parsed():
    parsed = parse_storage_cfg(STORAGE_CFG, "in")
    rendered = render_storage_cfg(parsed)
    assert parse_storage_cfg(rendered, "out") == parsed
    assert list(parse_storage_cfg(rendered, "out")) == ["local", "backup-nfs", "smb"]
    assert render_storage_cfg(parse_storage_cfg(rendered, "again")) == rendered


def test_storage_options_are_written_path_first_then_sorted():
    text = render_storage_cfg({"nb": {"type": "nfs", "server": "s", "export": "/e",
                                      "content": ["backup"], "path": "/mnt/b"}})
    assert text == "nfs: nb\n\tpath /mnt/b\n\tcontent backup\n\texport /e\n\tserver s\n"


def test_storages_stay_in_the_order_given_separated_by_a_blank_line():
    text = render_storage_cfg({"zz": {"path": "/z"}, "aa": {"path": "/a"}})
    assert text == "dir: zz\n\tpath /z\n\ndir: aa\n\tpath /a\n"


def test_a_changed_storage_config_writes_its_new_values():
    storage = parse_storage_cfg(STORAGE_CFG, "in")["local"]
    storage.path = "/srv/backup"
    storage.prune_backups = {"keep-weekly": 2}
    storage.disable = False
    storage.content = ["backup"]
    again = parse_storage_cfg(render_storage_cfg({"local": storage}), "out")["local"]
    assert (again.path, again.prune_backups, again.disable, again.content) == (
        "/srv/backup", {"keep-weekly": 2}, False, ["backup"])
    assert again.max_protected_backups == -1 and again.shared


def test_a_storage_config_built_in_code_is_written_with_only_what_differs_from_defaults():
    storage = StorageConfig(id="bk", type="dir", path="/b", prune_backups={"keep-last": 1})
    assert render_storage_cfg({"bk": storage}) == (
        "dir: bk\n\tpath /b\n\tprune-backups keep-last=1\n")
    assert parse_storage_cfg(render_storage_cfg({"bk": storage}), "x")["bk"].prune_backups == {
        "keep-last": 1}


def test_storage_render_refuses_bad_ids_and_line_breaks():
    with pytest.raises(ConfigError, match="not a valid storage id"):
        render_storage_cfg({"a b": {"path": "/x"}})
    with pytest.raises(ConfigError, match="path: the value must be one line"):
        render_storage_cfg({"ab": {"path": "/x\n\tdisable"}})


# ------------------------------------------------------------------ the node_config engine

POLICY = {"mode": "snapshot", "prune_backups": "keep-daily=3,keep-weekly=2,keep-monthly=1"}


def _storages(tmp_path):
    return {"backups": {"path": str(tmp_path / "store"), "content": ["backup"],
                        "prune_backups": {"keep_last": 2}, "max_protected_backups": 3}}


def test_apply_writes_both_files_creates_the_storage_dir_and_then_changes_nothing(tmp_path):
    etc = str(tmp_path / "etc")
    result = apply_node_config(etc, vzdump=POLICY, storages=_storages(tmp_path))
    assert result["changed"] and result["storages"] == ["backups"]
    assert result["created_dirs"] == [etc, str(tmp_path / "store")]
    assert open(os.path.join(etc, "vzdump.conf")).read() == (
        "mode: snapshot\nprune-backups: keep-daily=3,keep-weekly=2,keep-monthly=1\n")
    assert parse_storage_cfg(open(os.path.join(etc, "storage.cfg")).read(), "x")[
        "backups"].prune_backups == {"keep-last": 2}
    assert stat.S_IMODE(os.stat(tmp_path / "store").st_mode) == 0o750
    again = apply_node_config(etc, vzdump=POLICY, storages=_storages(tmp_path))
    assert not again["changed"] and again["diff"] == [] and again["created_dirs"] == []


def test_check_mode_predicts_the_change_and_writes_nothing(tmp_path):
    etc = str(tmp_path / "etc")
    result = apply_node_config(etc, vzdump=POLICY, storages=_storages(tmp_path), check_mode=True)
    assert result["changed"] and len(result["diff"]) == 3
    assert not os.path.exists(etc) and not os.path.exists(tmp_path / "store")


def test_dashes_underscores_and_dict_or_string_property_values_mean_the_same(tmp_path):
    a = apply_node_config(str(tmp_path / "a"), vzdump={
        "prune_backups": {"keep_daily": 3}, "performance": {"max_workers": 4}, "remove": True})
    b = apply_node_config(str(tmp_path / "b"), vzdump={
        "prune-backups": "keep-daily=3,keep-last=0", "performance": "max-workers=4",
        "remove": "yes"})
    assert a["diff"][0]["after"] == b["diff"][0]["after"] == (
        "performance: max-workers=4\nprune-backups: keep-daily=3\nremove: 1\n")


def test_none_leaves_a_file_alone_and_an_empty_dict_empties_it(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "storage.cfg").write_text("dir: keep\n\tpath /keep\n")
    (etc / "vzdump.conf").write_text("mode: stop\n")
    result = apply_node_config(str(etc), vzdump={})
    assert result["files"] == {"vzdump.conf": {"path": str(etc / "vzdump.conf"),
                                               "changed": True}}
    assert (etc / "vzdump.conf").read_text() == ""
    assert (etc / "storage.cfg").read_text() == "dir: keep\n\tpath /keep\n"


def test_a_null_option_is_left_out(tmp_path):
    result = apply_node_config(str(tmp_path), vzdump={"mode": "stop", "bwlimit": None},
                               check_mode=True)
    assert result["diff"][0]["after"] == "mode: stop\n"


@pytest.mark.parametrize("vzdump,storages,words", [
    ({"no_such_key": 1}, None, ["vzdump: unknown option 'no_such_key'"]),
    ({"bwlimit": -1}, None, ["vzdump: bwlimit: -1 is too small"]),
    ({"prune_backups": "keep-daily=three"}, None, ["prune-backups: keep-daily", "not an integer"]),
    ({"prune_backups": "keep-dayly=3"}, None, ["prune-backups: unknown key 'keep-dayly'"]),
    ({"mode": "snapshot", "mode_": 1}, None, ["unknown option 'mode_'"]),
    ({"prune_backups": "keep-daily=1", "prune-backups": "keep-daily=2"}, None, ["given twice"]),
    ({"notes_template": "{{nope}}"}, None, ["notes-template"]),
    (None, {"nas": {"content": ["backup"]}}, ["storage 'nas'", "needs 'path'"]),
    (None, {"nas": {"path": "relative"}}, ["storage 'nas': path", "relative path"]),
    (None, {"nas": {"path": "/x", "colour": "red"}}, ["storage 'nas': unknown option 'colour'"]),
    (None, {"nas": {"path": "/x", "type": "zfs"}}, ["storage type 'zfs' is not supported"]),
    (None, {"nas": {"path": "/x", "prune_backups": "keep-last=-2"}}, ["prune-backups: keep-last"]),
    (None, {"nas": {"path": "/x", "content": "backup,movies"}}, ["unknown content type 'movies'"]),
    (None, {"1nas": {"path": "/x"}}, ["not a valid storage id"]),
    (None, {"nas": "/x"}, ["as a dictionary"]),
])
def test_bad_input_fails_naming_the_key_and_writes_nothing(tmp_path, vzdump, storages, words):
    etc = tmp_path / "etc"
    with pytest.raises(ConfigError) as err:
        apply_node_config(str(etc), vzdump=vzdump, storages=storages)
    for word in words:
        assert word in str(err.value)
    assert " line " not in str(err.value)
    assert not etc.exists()


def test_a_storage_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        apply_node_config(str(tmp_path / "etc"), storages={"bk": {"path": str(tmp_path / "file")}})


def test_dirs_are_created_only_where_proxmox_would_create_them(tmp_path):
    storages = {
        "off": {"path": str(tmp_path / "off"), "disable": True},
        "nomk": {"path": str(tmp_path / "nomk"), "create_base_path": False},
        "other": {"path": str(tmp_path / "other"), "nodes": ["elsewhere"]},
        "nfs": {"type": "nfs", "path": str(tmp_path / "nfs"), "server": "s", "export": "/e"},
        "mine": {"path": str(tmp_path / "mine"), "nodes": ["here"]},
    }
    result = apply_node_config(str(tmp_path / "etc"), storages=storages, node="here")
    assert result["created_dirs"] == [str(tmp_path / "etc"), str(tmp_path / "mine")]


# ------------------------------------------------------------------ datastores

DATASTORE = ("datastore: pbs\n\tpath /srv/pbs\n\tencryption-key /etc/gv/pbs.json\n"
             "\tencryption-passphrase-file /etc/gv/pbs.pass\n\tmax-protected-backups 2\n"
             "\tprune-backups keep-last=3\n")


def test_a_datastore_reads_back_as_written():
    parsed = parse_storage_cfg(DATASTORE, "in")
    assert render_storage_cfg(parsed) == DATASTORE
    assert parse_storage_cfg(render_storage_cfg(parsed), "out") == parsed


def test_a_changed_datastore_key_is_written_and_a_removed_one_dropped():
    pbs = parse_storage_cfg(DATASTORE, "in")["pbs"]
    pbs.encryption_key = "/etc/gv/new.json"
    pbs.encryption_passphrase_file = None
    text = render_storage_cfg({"pbs": pbs})
    assert "\tencryption-key /etc/gv/new.json\n" in text
    assert "encryption-passphrase-file" not in text
    again = parse_storage_cfg(text, "out")["pbs"]
    assert (again.kind, again.encryption_key, again.encryption_passphrase_file) == (
        "datastore", "/etc/gv/new.json", None)


def test_a_datastore_built_in_code_is_written_with_its_key():
    storage = StorageConfig(id="pbs", type="datastore", path="/srv/pbs",
                            encryption_key="/k.json")
    assert render_storage_cfg({"pbs": storage}) == (
        "datastore: pbs\n\tpath /srv/pbs\n\tencryption-key /k.json\n")


def test_node_config_declares_a_datastore_with_underscored_keys(tmp_path):
    etc = str(tmp_path / "etc")
    result = apply_node_config(etc, storages={"pbs": {
        "type": "datastore", "path": str(tmp_path / "pbs"),
        "encryption_key": "/etc/gv/pbs.json", "encryption_passphrase_file": "/etc/gv/pbs.pass",
        "prune_backups": {"keep_daily": 7}}})
    assert result["storages"] == ["pbs"]
    # the chunk store is created by its first backup (65536 directories), not here
    assert result["created_dirs"] == [etc]
    pbs = parse_storage_cfg(open(os.path.join(etc, "storage.cfg")).read(), "x")["pbs"]
    assert (pbs.kind, pbs.encryption_key, pbs.encryption_passphrase_file) == (
        "datastore", "/etc/gv/pbs.json", "/etc/gv/pbs.pass")
    assert not apply_node_config(etc, storages={"pbs": {
        "type": "datastore", "path": str(tmp_path / "pbs"),
        "encryption-key": "/etc/gv/pbs.json", "encryption-passphrase-file": "/etc/gv/pbs.pass",
        "prune-backups": "keep-daily=7"}})["changed"]


@pytest.mark.parametrize("storage, words", [
    ({"type": "datastore", "path": "/x", "encryption_key": "pbs.json"},
     ["storage 'pbs': encryption-key", "relative path"]),
    ({"type": "datastore", "path": "/x", "encryption_passphrase_file": "/p"},
     ["datastore 'pbs' has an encryption-passphrase-file but no encryption-key"]),
    ({"type": "datastore", "path": "/x", "mkdir": False},
     ["storage 'pbs': unknown option 'mkdir'", "encryption-key"]),
    ({"type": "datastore", "path": "/x", "encryption_passphrase": "secret"},
     ["unknown option 'encryption_passphrase'"]),
])
def test_node_config_refuses_a_malformed_datastore(tmp_path, storage, words):
    with pytest.raises(ConfigError) as caught:
        apply_node_config(str(tmp_path / "etc"), storages={"pbs": storage})
    for word in words:
        assert word in str(caught.value)
    assert not os.path.exists(tmp_path / "etc")


def test_an_s3_endpoint_is_declared_its_inline_secret_masked_and_kept_private(tmp_path):
    storages = {
        'aws': {'type': 's3-endpoint', 'endpoint': '{{bucket}}.s3.{{region}}.amazonaws.com',
                'region': 'eu-central-1', 'access_key': 'AKIA1', 'secret_key': 'SEKRIT'},
        'offsite': {'type': 'datastore', 'path': '/var/cache/offsite',
                    'backend': {'type': 's3', 'client': 'aws', 'bucket': 'acme-backups'}},
    }
    result = apply_node_config(str(tmp_path), storages=storages)
    path = tmp_path / 'storage.cfg'
    assert 'secret-key SEKRIT' in path.read_text()
    assert oct(path.stat().st_mode & 0o777) == '0o600'
    shown = result['diff'][0]['after']
    assert 'SEKRIT' not in shown and 'secret-key ********' in shown
    assert 'backend type=s3,client=aws,bucket=acme-backups' in shown
    assert result['created_dirs'] == []           # a cache is made by the first backup
    assert apply_node_config(str(tmp_path), storages=storages)['changed'] is False


# ------------------------------------------------------------------ notifications declared

NOTIFICATIONS = {
    "ops": {"type": "sendmail", "mailto": ["ops@example.com", "sre@example.com"],
            "from_address": "backup@example.com"},
    "relay": {"type": "smtp", "server": "mail.example.com", "port": 2525, "mode": "starttls",
              "username": "backup", "mailto": "admin@example.com",
              "from-address": "backup@example.com"},
    "phone": {"type": "gotify", "server": "https://gotify.example.com", "disable": True},
    "chat": {"type": "webhook", "method": "post", "url": "https://chat/{{ secrets.key }}",
             "header": {"Content-Type": "application/json"}, "body": '{"t": "{{ title }}"}'},
    "failures": {"type": "matcher", "target": ["ops", "relay"], "match_severity": "error",
                 "match_field": ["exact:type=vzdump,gc", "regex:hostname=^node"],
                 "match_calendar": "mon..fri 8-17", "mode": "any", "invert_match": False},
    "default-matcher": {"type": "matcher", "target": "mail-to-root", "disable": True},
}
SECRETS = {"relay": {"password": "pw-4711"}, "phone": {"token": "tok-0815"},
           "chat": {"secret": {"key": "hook-key-9"}}}


def test_notifications_are_written_as_pve_writes_them_with_secrets_only_in_priv(tmp_path):
    etc = tmp_path / "etc"
    result = apply_node_config(str(etc), notifications=NOTIFICATIONS,
                               notification_secrets=SECRETS)
    assert result["changed"] and result["notifications"] == list(NOTIFICATIONS)
    public = (etc / "notifications.cfg").read_text()
    private = (etc / "priv" / "notifications.cfg").read_text()
    config = load_notifications(str(etc))          # what a backup run reads
    assert config.targets["relay"].secrets == {"password": "pw-4711"}
    assert config.targets["phone"].secrets == {"token": "tok-0815"} and \
        config.targets["phone"].disabled
    assert config.targets["ops"].get("mailto") == ["ops@example.com", "sre@example.com"]
    chat = config.targets["chat"]
    assert decode_base64(chat.get("body"), "body") == '{"t": "{{ title }}"}'
    assert decode_base64(chat.get("header")[0]["value"], "h") == "application/json"
    assert decode_base64(chat.secrets["secret"][0]["value"], "s") == "hook-key-9"
    assert "\tsecret name=key\n" in public
    assert config.matchers["failures"].get("target") == ["ops", "relay"]
    assert config.matchers["default-matcher"].disabled
    for secret in ("pw-4711", "tok-0815", base64.b64encode(b"hook-key-9").decode()):
        assert secret not in public and secret not in str(result)
        assert secret in private
    assert stat.S_IMODE(os.stat(etc / "priv").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(etc / "priv" / "notifications.cfg").st_mode) == 0o600
    again = apply_node_config(str(etc), notifications=NOTIFICATIONS, notification_secrets=SECRETS)
    assert not again["changed"] and again["diff"] == []


def test_a_changed_secret_is_a_change_whose_diff_shows_it_masked(tmp_path):
    apply_node_config(str(tmp_path), notifications=NOTIFICATIONS, notification_secrets=SECRETS)
    (tmp_path / "priv").chmod(0o755)        # loosened by hand: made root-only again
    changed = apply_node_config(str(tmp_path), notifications=NOTIFICATIONS,
                                notification_secrets=dict(SECRETS, relay={"password": "pw-new"}),
                                check_mode=True)
    assert changed["changed"] and not changed["files"]["notifications.cfg"]["changed"]
    (diff,) = changed["diff"]
    assert diff["after_header"].endswith("priv/notifications.cfg (secrets masked)")
    assert "\tpassword ********\n" in diff["before"] and "\tpassword ********\n" in diff["after"]
    assert "value=********" in diff["after"]
    assert not any(s in str(changed) for s in ("pw-4711", "pw-new", "tok-0815"))
    assert "pw-4711" in (tmp_path / "priv" / "notifications.cfg").read_text()   # check mode
    apply_node_config(str(tmp_path), notifications=NOTIFICATIONS,
                      notification_secrets=dict(SECRETS, relay={"password": "pw-new"}))
    assert stat.S_IMODE(os.stat(tmp_path / "priv").st_mode) == 0o700


def test_no_secrets_leave_no_private_file_and_an_empty_dict_keeps_only_the_builtins(tmp_path):
    apply_node_config(str(tmp_path), notifications=NOTIFICATIONS, notification_secrets=SECRETS)
    result = apply_node_config(str(tmp_path), notifications={})
    assert result["files"]["priv/notifications.cfg"]["changed"]
    assert not (tmp_path / "priv" / "notifications.cfg").exists()
    assert (tmp_path / "notifications.cfg").read_text() == ""
    assert list(load_notifications(str(tmp_path)).targets) == ["mail-to-root"]


@pytest.mark.parametrize("notifications,secrets,words", [
    ({"x": {"type": "pushover", "server": "s"}}, None,
     ["notifications 'x': type 'pushover' is not one of sendmail, smtp, gotify, webhook"]),
    ({"m": {"type": "matcher", "target": ["ops", "nowhere"]},
      "ops": {"type": "sendmail", "mailto": "a@b"}}, None,
     ["notifications 'm': target: matcher 'm' names the target 'nowhere'"]),
    ({"m": {"type": "matcher", "match_field": "regex:hostname=(node"}}, None,
     ["notifications 'm': match-field:", "not a valid regular expression"]),
    ({"m": {"type": "matcher", "match_calendar": "someday"}}, None,
     ["notifications 'm': match-calendar:"]),
    ({"m": {"type": "matcher", "mode": "some"}}, None,
     ["notifications 'm': mode: 'some' is not allowed; use one of all, any"]),
    ({"r": {"type": "smtp", "server": "s", "from_address": "a@b", "port": 70000}}, None,
     ["notifications 'r': port: 70000 is too large"]),
    ({"r": {"type": "smtp", "server": "s", "from_address": "a@b", "colour": "red"}}, None,
     ["notifications 'r': unknown key 'colour' in smtp 'r'"]),
    ({"r": {"type": "smtp", "server": "s", "from_address": "a@b", "password": "pw-4711"}}, None,
     ["notifications 'r': password is a secret; give it in notification_secrets"]),
    ({"w": {"type": "webhook", "url": "u", "secret": {"k": "pw-4711"}}}, None,
     ["notifications 'w': secret is a secret"]),
    ({"g": {"type": "gotify", "server": "s"}}, None, ["'g'", "needs 'token'"]),
    ({"g": {"type": "gotify", "server": "s"}}, {"g": {"password": "pw-4711"}},
     ["notification_secrets 'g': unknown key 'password' in gotify 'g'"]),
    ({"s": {"type": "sendmail", "mailto": "a@b"}}, {"other": {"token": "pw-4711"}},
     ["notification_secrets 'other': no target of that name is declared"]),
    ({"s": {"type": "sendmail", "comment": "two\nlines"}}, None,
     ["notifications 's': comment: the value has a line break"]),
    (None, {"s": {"token": "pw-4711"}}, ["give them together with notifications"]),
])
def test_a_malformed_notification_is_refused_naming_the_entry_and_nothing_is_written(
        tmp_path, notifications, secrets, words):
    with pytest.raises(ConfigError) as caught:
        apply_node_config(str(tmp_path / "etc"), vzdump=POLICY, notifications=notifications,
                          notification_secrets=secrets)
    for word in words:
        assert word in str(caught.value)
    assert "pw-4711" not in str(caught.value)
    assert not (tmp_path / "etc").exists()
