"""Node configuration in Proxmox syntax: property strings, vzdump.conf, storage.cfg."""

import pytest

from guestvault_engine.policy import config
from guestvault_engine.policy.config import (
    PERFORMANCE_SCHEMA,
    PRUNE_BACKUPS_SCHEMA,
    load_storage,
    load_vzdump_defaults,
    parse_property_string,
    parse_storage_cfg,
    parse_vzdump_conf,
)
from guestvault_engine.errors import ConfigError, NotesTemplateError


# ------------------------------------------------------------------ property strings

def test_property_string_is_parsed_to_typed_values():
    assert parse_property_string("keep-last=3,keep-daily=13", PRUNE_BACKUPS_SCHEMA, "x") == {
        "keep-last": 3, "keep-daily": 13}


def test_property_string_accepts_plain_types_in_the_schema():
    schema = {"name": str, "count": int, "on": bool}
    assert parse_property_string("name=a b,count=2,on=yes", schema, "x") == {
        "name": "a b", "count": 2, "on": True}


@pytest.mark.parametrize("text,expected", [
    ("1", True), ("yes", True), ("true", True), ("on", True), ("ON", True),
    ("0", False), ("no", False), ("false", False), ("off", False), ("No", False),
])
def test_booleans_accept_proxmox_spellings(text, expected):
    assert parse_property_string(f"keep-all={text}", PRUNE_BACKUPS_SCHEMA, "x") == {
        "keep-all": expected}


def test_a_bad_boolean_says_which_spellings_work():
    with pytest.raises(ConfigError, match="yes/no"):
        parse_property_string("keep-all=maybe", PRUNE_BACKUPS_SCHEMA, "prune-backups")


def test_unknown_key_names_the_option_the_key_and_the_allowed_keys():
    with pytest.raises(ConfigError) as err:
        parse_property_string("keep-lst=3", PRUNE_BACKUPS_SCHEMA, "prune-backups")
    message = str(err.value)
    assert message.startswith("prune-backups: ")
    assert "keep-lst" in message
    assert "keep-last" in message and "keep-yearly" in message


def test_duplicate_key_is_rejected():
    with pytest.raises(ConfigError, match="keep-last.*twice"):
        parse_property_string("keep-last=3,keep-last=4", PRUNE_BACKUPS_SCHEMA, "prune-backups")


@pytest.mark.parametrize("text", ["keep-last", "keep-last=", "=3"])
def test_malformed_pieces_are_rejected(text):
    with pytest.raises(ConfigError, match="prune-backups"):
        parse_property_string(text, PRUNE_BACKUPS_SCHEMA, "prune-backups")


def test_negative_counts_are_rejected_with_the_minimum():
    with pytest.raises(ConfigError, match="keep-daily.*minimum is 0"):
        parse_property_string("keep-daily=-1", PRUNE_BACKUPS_SCHEMA, "prune-backups")


def test_non_numbers_are_rejected():
    with pytest.raises(ConfigError, match="'three' is not an integer"):
        parse_property_string("keep-last=three", PRUNE_BACKUPS_SCHEMA, "prune-backups")


def test_max_workers_must_be_within_1_and_256():
    assert parse_property_string("max-workers=16", PERFORMANCE_SCHEMA, "performance") == {
        "max-workers": 16}
    with pytest.raises(ConfigError, match="minimum is 1"):
        parse_property_string("max-workers=0", PERFORMANCE_SCHEMA, "performance")
    with pytest.raises(ConfigError, match="maximum is 256"):
        parse_property_string("max-workers=257", PERFORMANCE_SCHEMA, "performance")


def test_performance_accepts_pbs_entries_max():
    assert parse_property_string("pbs-entries-max=2048", PERFORMANCE_SCHEMA, "p") == {
        "pbs-entries-max": 2048}


def test_empty_pieces_and_spaces_are_ignored_like_proxmox():
    assert parse_property_string(" keep-last=3 ,, ", PRUNE_BACKUPS_SCHEMA, "x") == {
        "keep-last": 3}


def test_a_bare_value_goes_to_the_default_key():
    assert parse_property_string("1,storage=fast", config.FLEECING_SCHEMA, "fleecing") == {
        "enabled": True, "storage": "fast"}


# ------------------------------------------------------------------ retention normalisation

def test_prune_backups_with_only_zero_counts_means_keep_all():
    assert config.parse_prune_backups("keep-last=0", "x") == {"keep-all": True}


def test_prune_backups_drops_zero_counts():
    assert config.parse_prune_backups("keep-last=2,keep-daily=0", "x") == {"keep-last": 2}


def test_keep_all_with_a_count_is_a_contradiction():
    with pytest.raises(ConfigError, match="keep-all=1 cannot be combined with keep-last"):
        config.parse_prune_backups("keep-all=1,keep-last=2", "prune-backups")


def test_keep_all_off_with_counts_keeps_the_counts():
    assert config.parse_prune_backups("keep-all=0,keep-weekly=4", "x") == {"keep-weekly": 4}


# ------------------------------------------------------------------ vzdump.conf

VZDUMP_CONF = """\
# defaults for every job on this node
tmpdir: /var/tmp
storage: local
mode: stop
bwlimit: 10240
ionice: 7
lockwait: 180
stopwait: 10
stdexcludes: 0
mailto: root@example.org, ops@example.org
prune-backups: keep-last=3,keep-daily=13
performance: max-workers=16
script: /usr/local/bin/vzdump-hook
exclude-path: /tmp/?* "/var/cache/with space"
exclude-path: /var/log/?*
pigz: 2
zstd: 0
notes-template: {{guestname}} ({{vmid}})
compress: zstd
remove: yes
protected: off
fleecing: enabled=1,storage=fast

dumpdir: /srv/dump
"""


def test_vzdump_conf_values_are_typed():
    conf = parse_vzdump_conf(VZDUMP_CONF, "/etc/guestvault/vzdump.conf")
    assert conf == {
        "tmpdir": "/var/tmp",
        "storage": "local",
        "mode": "stop",
        "bwlimit": 10240,
        "ionice": 7,
        "lockwait": 180,
        "stopwait": 10,
        "stdexcludes": False,
        "mailto": ["root@example.org", "ops@example.org"],
        "prune-backups": {"keep-last": 3, "keep-daily": 13},
        "performance": {"max-workers": 16},
        "script": "/usr/local/bin/vzdump-hook",
        "exclude-path": ["/tmp/?*", "/var/cache/with space", "/var/log/?*"],
        "pigz": 2,
        "zstd": 0,
        "notes-template": "{{guestname}} ({{vmid}})",
        "compress": "zstd",
        "remove": True,
        "protected": False,
        "fleecing": {"enabled": True, "storage": "fast"},
        "dumpdir": "/srv/dump",
    }


def test_empty_vzdump_conf_is_an_empty_dict():
    assert parse_vzdump_conf("# all commented out\n\n", "vzdump.conf") == {}


def test_unknown_vzdump_option_names_file_line_and_key():
    with pytest.raises(ConfigError) as err:
        parse_vzdump_conf("mode: stop\nmaxworkers: 3\n", "/etc/guestvault/vzdump.conf")
    message = str(err.value)
    assert message.startswith("/etc/guestvault/vzdump.conf line 2: ")
    assert "maxworkers" in message and "performance" in message


def test_malformed_vzdump_line_names_file_and_line():
    with pytest.raises(ConfigError, match=r"^vzdump.conf line 1: .*'mode stop'"):
        parse_vzdump_conf("mode stop\n", "vzdump.conf")


def test_bad_mode_lists_the_modes():
    with pytest.raises(ConfigError, match="line 1: mode: 'pause'.*snapshot, suspend, stop"):
        parse_vzdump_conf("mode: pause\n", "vzdump.conf")


def test_bad_compress_lists_the_choices():
    with pytest.raises(ConfigError, match="compress.*0, 1, gzip, lzo, zstd"):
        parse_vzdump_conf("compress: xz\n", "vzdump.conf")


def test_negative_bwlimit_is_rejected():
    with pytest.raises(ConfigError, match="line 1: bwlimit: -5 is too small"):
        parse_vzdump_conf("bwlimit: -5\n", "vzdump.conf")


def test_ionice_is_limited_to_0_to_8():
    with pytest.raises(ConfigError, match="ionice: 9 is too large, the maximum is 8"):
        parse_vzdump_conf("ionice: 9\n", "vzdump.conf")


def test_property_string_errors_carry_file_and_line():
    with pytest.raises(ConfigError, match=r"vzdump.conf line 2: prune-backups: unknown key"):
        parse_vzdump_conf("mode: stop\nprune-backups: keep=3\n", "vzdump.conf")


def test_a_repeated_option_is_rejected():
    with pytest.raises(ConfigError, match="line 2: option 'mode' is set a second time"):
        parse_vzdump_conf("mode: stop\nmode: snapshot\n", "vzdump.conf")


def test_an_option_without_value_is_rejected():
    with pytest.raises(ConfigError, match="line 1: option 'storage' has no value"):
        parse_vzdump_conf("storage:\n", "vzdump.conf")


def test_a_broken_notes_template_fails_when_the_file_is_read():
    with pytest.raises(NotesTemplateError, match="vzdump.conf line 1: notes-template.*{{name}}"):
        parse_vzdump_conf("notes-template: {{name}}\n", "vzdump.conf")


def test_a_relative_dumpdir_is_rejected():
    with pytest.raises(ConfigError, match="dumpdir: 'dump' is a relative path"):
        parse_vzdump_conf("dumpdir: dump\n", "vzdump.conf")


def test_an_invalid_storage_id_is_rejected():
    with pytest.raises(ConfigError, match="not a valid storage id"):
        parse_vzdump_conf("storage: 1local\n", "vzdump.conf")


def test_defaults_are_empty_without_vzdump_conf(tmp_path):
    assert load_vzdump_defaults(str(tmp_path)) == {}


def test_defaults_are_read_from_the_config_dir(tmp_path):
    (tmp_path / "vzdump.conf").write_text("mode: suspend\n")
    assert load_vzdump_defaults(str(tmp_path)) == {"mode": "suspend"}


def test_defaults_errors_name_the_real_file(tmp_path):
    (tmp_path / "vzdump.conf").write_text("bogus: 1\n")
    with pytest.raises(ConfigError, match=str(tmp_path / "vzdump.conf") + " line 1"):
        load_vzdump_defaults(str(tmp_path))


# ------------------------------------------------------------------ storage.cfg

STORAGE_CFG = """\
# storages of node kvm1
dir: local
\tpath /var/lib/guestvault/
\tcontent backup,iso
\tprune-backups keep-last=3,keep-daily=7
\tmax-protected-backups -1

dir: scratch
    path /srv/scratch
    content backup
    disable
    nodes kvm1,kvm2
nfs: nas
\tpath /mnt/pve/nas
\tserver 192.0.2.10
\texport /export/backup
\tcontent backup
"""


def test_storage_cfg_sections_become_storage_configs():
    storages = parse_storage_cfg(STORAGE_CFG, "/etc/guestvault/storage.cfg")
    assert list(storages) == ["local", "scratch", "nas"]
    local = storages["local"]
    assert local.id == "local" and local.type == "dir"
    assert local.path == "/var/lib/guestvault"
    assert local.content == ["backup", "iso"]
    assert local.prune_backups == {"keep-last": 3, "keep-daily": 7}
    assert local.max_protected_backups == -1
    assert local.shared is False and local.disable is False and local.nodes == []
    assert local.options["content"] == "backup,iso"
    assert local.line == 2


def test_space_indented_options_and_bare_flags_are_understood():
    scratch = parse_storage_cfg(STORAGE_CFG, "storage.cfg")["scratch"]
    assert scratch.disable is True
    assert scratch.nodes == ["kvm1", "kvm2"]
    assert scratch.options["disable"] is None


def test_a_header_ends_the_previous_section_even_without_a_blank_line():
    nas = parse_storage_cfg(STORAGE_CFG, "storage.cfg")["nas"]
    assert nas.type == "nfs"
    assert nas.path == "/mnt/pve/nas"
    assert nas.options["server"] == "192.0.2.10"


def test_network_storages_are_shared_like_in_proxmox():
    assert parse_storage_cfg(STORAGE_CFG, "storage.cfg")["nas"].shared is True


def test_storage_defaults_follow_proxmox():
    storage = parse_storage_cfg("dir: local\n\tpath /srv\n", "storage.cfg")["local"]
    assert storage.max_protected_backups == 5
    assert storage.prune_backups is None
    assert storage.content == ["backup"]


def test_cifs_storage_is_accepted():
    text = "cifs: smb\n\tpath /mnt/pve/smb\n\tserver files\n\tshare backup\n"
    assert parse_storage_cfg(text, "storage.cfg")["smb"].type == "cifs"


def test_unsupported_storage_type_is_rejected_with_the_supported_ones():
    with pytest.raises(ConfigError, match="storage.cfg line 1: storage type 'lvm'.*dir, nfs, cifs"):
        parse_storage_cfg("lvm: vg\n\tvgname pve\n", "storage.cfg")


def test_duplicate_storage_ids_are_rejected_with_both_lines():
    text = "dir: local\n\tpath /a\n\ndir: local\n\tpath /b\n"
    with pytest.raises(ConfigError, match="line 4: storage 'local' is defined twice.*line 1"):
        parse_storage_cfg(text, "storage.cfg")


def test_unknown_storage_option_names_file_line_and_key():
    with pytest.raises(ConfigError) as err:
        parse_storage_cfg("dir: local\n\tpath /srv\n\tpaht /srv\n", "/etc/guestvault/storage.cfg")
    message = str(err.value)
    assert message.startswith("/etc/guestvault/storage.cfg line 3: ")
    assert "'paht'" in message and "path" in message


def test_dir_storage_without_path_is_rejected():
    with pytest.raises(ConfigError, match="line 1: dir storage 'local' has no path"):
        parse_storage_cfg("dir: local\n\tcontent backup\n", "storage.cfg")


def test_relative_storage_path_is_rejected():
    with pytest.raises(ConfigError, match="line 2: path: 'backups' is a relative path"):
        parse_storage_cfg("dir: local\n\tpath backups\n", "storage.cfg")


def test_repeated_storage_option_is_rejected():
    with pytest.raises(ConfigError, match="line 3: option 'path' is set a second time"):
        parse_storage_cfg("dir: local\n\tpath /a\n\tpath /b\n", "storage.cfg")


def test_option_outside_a_section_is_rejected():
    with pytest.raises(ConfigError, match="line 4: indented option 'content backup'"):
        parse_storage_cfg("dir: local\n\tpath /a\n\n\tcontent backup\n", "storage.cfg")


def test_unparseable_line_is_rejected():
    with pytest.raises(ConfigError, match="line 1: cannot parse 'dir local'"):
        parse_storage_cfg("dir local\n", "storage.cfg")


def test_unknown_content_type_is_rejected():
    with pytest.raises(ConfigError, match="unknown content type 'backups'"):
        parse_storage_cfg("dir: local\n\tpath /a\n\tcontent backups\n", "storage.cfg")


def test_bad_prune_backups_in_storage_names_the_line():
    with pytest.raises(ConfigError, match="line 3: prune-backups: keep-last: -1 is too small"):
        parse_storage_cfg("dir: local\n\tpath /a\n\tprune-backups keep-last=-1\n", "storage.cfg")


def test_max_protected_backups_below_minus_one_is_rejected():
    with pytest.raises(ConfigError, match="minimum is -1"):
        parse_storage_cfg("dir: local\n\tpath /a\n\tmax-protected-backups -2\n", "storage.cfg")


def test_option_needing_a_value_without_one_is_rejected():
    with pytest.raises(ConfigError, match="line 2: path: needs a value"):
        parse_storage_cfg("dir: local\n\tpath\n", "storage.cfg")


@pytest.mark.parametrize("storage_id", ["x", "1local", "local-", "my_st@re"])
def test_invalid_storage_id_is_rejected_like_proxmox(storage_id):
    with pytest.raises(ConfigError, match=f"line 1: '{storage_id}' is not a valid storage id"):
        parse_storage_cfg(f"dir: {storage_id}\n\tpath /a\n", "storage.cfg")


def test_load_storage_returns_the_named_storage(tmp_path):
    (tmp_path / "storage.cfg").write_text(STORAGE_CFG)
    storage = load_storage(str(tmp_path), "local")
    assert storage.path == "/var/lib/guestvault"
    assert storage.source == str(tmp_path / "storage.cfg")


def test_load_storage_without_storage_cfg_says_what_to_create(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_storage(str(tmp_path), "local")
    message = str(err.value)
    assert str(tmp_path / "storage.cfg") in message
    assert "dir: local" in message and "path " in message


def test_load_storage_with_unknown_id_lists_the_defined_ones(tmp_path):
    (tmp_path / "storage.cfg").write_text(STORAGE_CFG)
    with pytest.raises(ConfigError, match="'backup' is not defined.*local, scratch, nas"):
        load_storage(str(tmp_path), "backup")


def test_load_storage_refuses_a_disabled_storage(tmp_path):
    (tmp_path / "storage.cfg").write_text(STORAGE_CFG)
    with pytest.raises(ConfigError, match="'scratch' is disabled.*line 8.*remove its 'disable'"):
        load_storage(str(tmp_path), "scratch")


def test_load_storage_refuses_a_storage_without_backup_content(tmp_path):
    (tmp_path / "storage.cfg").write_text("dir: iso\n\tpath /srv/iso\n\tcontent iso\n")
    with pytest.raises(ConfigError, match="add 'backup' to its content"):
        load_storage(str(tmp_path), "iso")


def test_load_storage_refuses_a_storage_not_meant_for_this_node(tmp_path):
    (tmp_path / "storage.cfg").write_text("dir: local\n\tpath /srv\n\tnodes kvm1,kvm2\n")
    assert load_storage(str(tmp_path), "local", node="kvm2").id == "local"
    with pytest.raises(ConfigError, match="not available on node 'kvm3'.*kvm1, kvm2"):
        load_storage(str(tmp_path), "local", node="kvm3")


# ------------------------------------------------------------------ datastore storages

DATASTORE_CFG = """\
dir: local
\tpath /var/lib/guestvault

datastore: pbs
\tpath /srv/pbs/
\tencryption-key /etc/guestvault/keys/pbs.json
\tencryption-passphrase-file /etc/guestvault/keys/pbs.pass
\tprune-backups keep-daily=7
\tmax-protected-backups 2
\tnodes kvm1
"""


def test_a_datastore_section_is_a_datastore_with_its_key():
    storages = parse_storage_cfg(DATASTORE_CFG, "storage.cfg")
    pbs = storages["pbs"]
    assert (pbs.type, pbs.kind, pbs.path) == ("datastore", "datastore", "/srv/pbs")
    assert pbs.encryption_key == "/etc/guestvault/keys/pbs.json"
    assert pbs.encryption_passphrase_file == "/etc/guestvault/keys/pbs.pass"
    assert pbs.prune_backups == {"keep-daily": 7} and pbs.max_protected_backups == 2
    assert pbs.nodes == ["kvm1"] and pbs.content == ["backup"] and not pbs.shared
    local = storages["local"]
    assert (local.kind, local.encryption_key, local.encryption_passphrase_file) == (
        "dir", None, None)


@pytest.mark.parametrize("storage_type", ["dir", "nfs", "cifs"])
def test_directory_storages_of_every_type_hold_qcow2_chains(storage_type):
    assert config.StorageConfig(id="a", type=storage_type, path="/a").kind == "dir"


def test_an_unencrypted_datastore_needs_only_a_path():
    pbs = parse_storage_cfg("datastore: pbs\n\tpath /srv/pbs\n", "storage.cfg")["pbs"]
    assert pbs.kind == "datastore" and pbs.encryption_key is None


@pytest.mark.parametrize("line, words", [
    ("encryption-key keys/pbs.json", r"line 3: encryption-key: 'keys/pbs.json' is a relative path"),
    ("encryption-key /etc/keys/", r"encryption-key: '/etc/keys/' names a directory"),
    ("encryption-key", r"encryption-key: needs a value"),
    ("encryption-passphrase-file pass.txt", r"encryption-passphrase-file: 'pass.txt' is a relative"),
    ("mkdir 0", r"line 3: unknown option 'mkdir' for a datastore storage; known options: "
                r"backend, content, disable, encryption-key, encryption-passphrase-file"),
    ("shared 1", r"unknown option 'shared' for a datastore"),
])
def test_a_malformed_datastore_option_names_the_line_and_what_to_write(line, words):
    text = f"datastore: pbs\n\tpath /srv/pbs\n\t{line}\n"
    with pytest.raises(ConfigError, match=words):
        parse_storage_cfg(text, "storage.cfg")


def test_a_datastore_needs_a_path():
    with pytest.raises(ConfigError, match="datastore storage 'pbs' has no path"):
        parse_storage_cfg("datastore: pbs\n\tencryption-key /k.json\n", "storage.cfg")


def test_a_passphrase_file_without_a_key_is_refused():
    text = "datastore: pbs\n\tpath /srv/pbs\n\tencryption-passphrase-file /etc/pass\n"
    with pytest.raises(ConfigError, match="line 1: datastore 'pbs' has an "
                                          "encryption-passphrase-file but no encryption-key"):
        parse_storage_cfg(text, "storage.cfg")


def test_a_dir_storage_takes_no_encryption_key():
    with pytest.raises(ConfigError, match="unknown option 'encryption-key' for a dir storage"):
        parse_storage_cfg("dir: local\n\tpath /a\n\tencryption-key /k.json\n", "storage.cfg")


def test_load_storage_returns_a_datastore(tmp_path):
    (tmp_path / "storage.cfg").write_text(DATASTORE_CFG)
    assert load_storage(str(tmp_path), "pbs", node="kvm1").kind == "datastore"


S3_CFG = """\
s3-endpoint: aws
\tendpoint {{bucket}}.s3.{{region}}.amazonaws.com
\tregion eu-central-1
\taccess-key AKIAEXAMPLE
\tsecret-key-file /etc/guestvault/s3.secret

s3-endpoint: lab
\tendpoint http://127.0.0.1:8333
\taccess-key lab
\tsecret-key inline-secret
\tpath-style 1

datastore: offsite
\tpath /var/cache/guestvault/offsite
\tbackend type=s3,client=aws,bucket=acme-backups
\tprune-backups keep-daily=7
"""


def test_an_s3_datastore_names_its_endpoint_and_bucket():
    storages = parse_storage_cfg(S3_CFG, "storage.cfg")
    offsite = storages["offsite"]
    assert offsite.kind == "datastore" and offsite.path == "/var/cache/guestvault/offsite"
    assert offsite.s3_backend == {"type": "s3", "client": "aws", "bucket": "acme-backups"}
    assert storages["aws"].kind == "s3-endpoint" and storages["aws"].s3_backend is None
    assert parse_storage_cfg("datastore: dd\n\tpath /d\n\tbackend type=filesystem\n",
                             "s")["dd"].s3_backend is None


def test_load_s3_endpoint_reads_the_secret_file_and_builds_the_url(tmp_path):
    secret = tmp_path / "s3.secret"
    secret.write_text("the-secret\n")
    (tmp_path / "storage.cfg").write_text(S3_CFG.replace("/etc/guestvault/s3.secret",
                                                         str(secret)))
    offsite = load_storage(str(tmp_path), "offsite")
    endpoint = config.load_s3_endpoint(str(tmp_path), offsite)
    assert endpoint.url == "https://s3.eu-central-1.amazonaws.com"
    assert (endpoint.region, endpoint.access_key, endpoint.secret_key) == (
        "eu-central-1", "AKIAEXAMPLE", "the-secret")
    assert not endpoint.path_style and "the-secret" not in repr(endpoint)
    lab = config.load_s3_endpoint(str(tmp_path), config.StorageConfig(
        id="x", type="datastore", path="/x", backend={"type": "s3", "client": "lab",
                                                      "bucket": "b1b"}))
    assert (lab.url, lab.secret_key, lab.path_style, lab.region) == (
        "http://127.0.0.1:8333", "inline-secret", True, "us-east-1")


def test_an_s3_endpoint_is_not_a_storage_and_a_missing_secret_file_is_named(tmp_path):
    (tmp_path / "storage.cfg").write_text(S3_CFG)
    with pytest.raises(ConfigError, match="'aws' is an S3 endpoint .* not a storage"):
        load_storage(str(tmp_path), "aws")
    with pytest.raises(ConfigError, match="cannot read secret-key-file /etc/guestvault/s3.secret"):
        config.load_s3_endpoint(str(tmp_path), load_storage(str(tmp_path), "offsite"))


@pytest.mark.parametrize("text, words", [
    ("datastore: dd\n\tpath /d\n\tbackend type=s3,bucket=b12\n", "an s3 backend needs client="),
    ("datastore: dd\n\tpath /d\n\tbackend type=s3,client=c\n", "an s3 backend needs bucket="),
    ("datastore: dd\n\tpath /d\n\tbackend type=s3,client=c,bucket=Bad_Name\n",
     "'Bad_Name' is not a valid S3 bucket name"),
    ("datastore: dd\n\tpath /d\n\tbackend type=ftp\n", "backend type 'ftp' is not supported"),
    ("datastore: dd\n\tpath /d\n\tbackend type=filesystem,bucket=b12\n",
     "client and bucket are only for 'type=s3'"),
    ("s3-endpoint: ee\n\taccess-key a\n\tsecret-key s\n", "s3-endpoint 'ee' has no endpoint"),
    ("s3-endpoint: ee\n\tendpoint h\n\taccess-key a\n",
     "needs exactly one of secret-key and secret-key-file"),
    ("s3-endpoint: ee\n\tendpoint h\n\taccess-key a\n\tsecret-key s\n\tport 99999\n",
     "port: 99999 is too large"),
    ("s3-endpoint: ee\n\tendpoint h\n\taccess-key a\n\tsecret-key s\n\tpath /x\n",
     "unknown option 'path' for a s3-endpoint storage"),
    # issue 20: each refused where storage.cfg is parsed, naming the key
    ("s3-endpoint: ee\n\tendpoint ftp://h.example\n\taccess-key a\n\tsecret-key s\n",
     "line 2: endpoint: 'ftp://h.example' is not an http or https URL; give a bare host"),
    ("s3-endpoint: ee\n\tendpoint h.example/bucket\n\taccess-key a\n\tsecret-key s\n",
     "line 2: endpoint: 'h.example/bucket' is not a host name"),
    ("s3-endpoint: ee\n\tendpoint h\n\taccess-key a\n\tsecret-key s\n\tfingerprint zz:zz\n",
     "line 5: fingerprint: 'zz:zz' is not a sha256 fingerprint; give the certificate's 32 bytes"),
    ("s3-endpoint: ee\n\tendpoint h\n\taccess-key a\n\tsecret-key s\n"
     "\tca-file /nonexistent/ca.pem\n",
     "line 5: ca-file: /nonexistent/ca.pem does not exist or is not a file"),
])
def test_a_malformed_s3_section_says_what_to_write(text, words):
    with pytest.raises(ConfigError, match=words):
        parse_storage_cfg(text, "storage.cfg")


def test_https_urls_bare_hosts_both_fingerprint_spellings_and_a_ca_file_are_accepted(tmp_path):
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("-----BEGIN CERTIFICATE-----\n")
    for endpoint, fingerprint in (("https://s3.example:9000", ":".join(["Ab"] * 32)),
                                  ("{{bucket}}.s3.{{region}}.amazonaws.com", "ab" * 32),
                                  ("minio.lan:9000", "01" * 32)):
        text = (f"s3-endpoint: ee\n\tendpoint {endpoint}\n\taccess-key a\n\tsecret-key s\n"
                f"\tfingerprint {fingerprint}\n\tca-file {ca_file}\n")
        assert parse_storage_cfg(text, "storage.cfg")["ee"].options["endpoint"] == endpoint


def test_an_s3_datastore_renders_back_to_what_it_parsed():
    storages = parse_storage_cfg(S3_CFG, "storage.cfg")
    assert parse_storage_cfg(config.render_storage_cfg(storages), "storage.cfg") == storages
