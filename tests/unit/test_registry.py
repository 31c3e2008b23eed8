"""The guest registry: guests.d/<vmid>.conf."""

import dataclasses

import pytest

from guestvault_engine.guest import registry
from guestvault_engine.errors import ConfigError, GuestNotFound
from guestvault_engine.guest.registry import GuestEntry, list_guests, load_guest, render_guest

FULL = """\
# mail server
name: mail
qmp: /run/qemu/105.qmp
agent: /run/qemu/105.qga
pool: production
tags: mail;critical, eu
exclude: virtio1, scsi2
start: systemctl start qemu@105
description: Mail server.
description:
description: Scratch disk virtio1 is not backed up.
"""


def write_guest(config_dir, vmid, text):
    guests = config_dir / "guests.d"
    guests.mkdir(exist_ok=True)
    (guests / f"{vmid}.conf").write_text(text)
    return guests / f"{vmid}.conf"


def test_all_keys_are_read(tmp_path):
    path = write_guest(tmp_path, 105, FULL)
    entry = load_guest(str(tmp_path), 105)
    assert entry == GuestEntry(
        vmid=105,
        name="mail",
        qmp_socket="/run/qemu/105.qmp",
        agent_socket="/run/qemu/105.qga",
        pool="production",
        tags=("mail", "critical", "eu"),
        include=(),
        exclude=("virtio1", "scsi2"),
        start_command="systemctl start qemu@105",
        description="Mail server.\n\nScratch disk virtio1 is not backed up.",
    )
    assert entry.source == str(path)


def test_only_qmp_is_required(tmp_path):
    write_guest(tmp_path, 100, "qmp: /run/qemu/100.qmp\n")
    entry = load_guest(str(tmp_path), 100)
    assert entry.qmp_socket == "/run/qemu/100.qmp"
    assert entry.name is None and entry.agent_socket is None and entry.start_command is None
    assert entry.tags == () and entry.include == () and entry.exclude == ()
    assert entry.description is None


def test_vmid_may_be_given_as_text(tmp_path):
    write_guest(tmp_path, 100, "qmp: /run/qemu/100.qmp\n")
    assert load_guest(str(tmp_path), "100").vmid == 100


def test_missing_qmp_says_what_to_add(tmp_path):
    write_guest(tmp_path, 100, "name: web\n")
    with pytest.raises(ConfigError, match="no 'qmp' line.*-qmp unix:"):
        load_guest(str(tmp_path), 100)


def test_relative_qmp_socket_is_rejected(tmp_path):
    write_guest(tmp_path, 100, "qmp: run/100.qmp\n")
    with pytest.raises(ConfigError, match="100.conf line 1: qmp: 'run/100.qmp' is not an absolute"):
        load_guest(str(tmp_path), 100)


def test_relative_agent_socket_is_rejected(tmp_path):
    write_guest(tmp_path, 100, "qmp: /run/100.qmp\nagent: 100.qga\n")
    with pytest.raises(ConfigError, match="line 2: agent"):
        load_guest(str(tmp_path), 100)


def test_unknown_key_names_file_line_and_known_keys(tmp_path):
    path = write_guest(tmp_path, 100, "qmp: /run/100.qmp\nqmp_socket: /x\n")
    with pytest.raises(ConfigError) as err:
        load_guest(str(tmp_path), 100)
    message = str(err.value)
    assert message.startswith(f"{path} line 2: ")
    assert "'qmp_socket'" in message and "agent" in message


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_guest(tmp_path, 100, "qmp: /run/100.qmp\n\nname mail\n")
    with pytest.raises(ConfigError, match=f"^{path} line 3: cannot parse 'name mail'"):
        load_guest(str(tmp_path), 100)


def test_repeated_key_is_rejected(tmp_path):
    write_guest(tmp_path, 100, "qmp: /a\nqmp: /b\n")
    with pytest.raises(ConfigError, match="line 2: 'qmp' is set a second time"):
        load_guest(str(tmp_path), 100)


def test_empty_value_is_rejected(tmp_path):
    write_guest(tmp_path, 100, "qmp: /a\nname:\n")
    with pytest.raises(ConfigError, match="line 2: 'name' has no value"):
        load_guest(str(tmp_path), 100)


def test_include_and_exclude_together_are_rejected(tmp_path):
    write_guest(tmp_path, 100, "qmp: /a\ninclude: virtio0\nexclude: virtio1\n")
    with pytest.raises(ConfigError, match="both 'include' and 'exclude'"):
        load_guest(str(tmp_path), 100)


def test_invalid_disk_id_is_rejected(tmp_path):
    write_guest(tmp_path, 100, "qmp: /a\ninclude: virtio0, 0disk\n")
    with pytest.raises(ConfigError, match="line 2: include: '0disk' is not valid"):
        load_guest(str(tmp_path), 100)


def test_invalid_tag_is_rejected(tmp_path):
    write_guest(tmp_path, 100, "qmp: /a\ntags: ok;-bad\n")
    with pytest.raises(ConfigError, match="tags: '-bad' is not valid"):
        load_guest(str(tmp_path), 100)


def test_repeated_tags_are_kept_once_in_order(tmp_path):
    write_guest(tmp_path, 100, "qmp: /a\ntags: b;a;b\n")
    assert load_guest(str(tmp_path), 100).tags == ("b", "a")


def test_invalid_pool_is_rejected(tmp_path):
    write_guest(tmp_path, 100, "qmp: /a\npool: my pool\n")
    with pytest.raises(ConfigError, match="pool: 'my pool' is not a valid pool name"):
        load_guest(str(tmp_path), 100)


@pytest.mark.parametrize("vmid", [99, 1000000000, 0, -5, "abc", "0100", "", None, 1.5, True])
def test_vmids_outside_100_to_999999999_are_rejected(vmid):
    with pytest.raises(ConfigError, match="100 to 999999999"):
        registry.validate_vmid(vmid)


@pytest.mark.parametrize("vmid", [100, 999999999, "4711"])
def test_vmids_in_range_are_accepted(vmid):
    assert registry.validate_vmid(vmid) == int(vmid)


def test_load_guest_validates_the_vmid(tmp_path):
    with pytest.raises(ConfigError, match="'42' is not a valid vmid"):
        load_guest(str(tmp_path), 42)


def test_unregistered_guest_lists_known_vmids_and_how_to_register(tmp_path):
    write_guest(tmp_path, 101, "qmp: /a\n")
    write_guest(tmp_path, 100, "qmp: /b\n")
    with pytest.raises(GuestNotFound) as err:
        load_guest(str(tmp_path), 105)
    message = str(err.value)
    assert "registered guests: 100, 101" in message
    assert str(tmp_path / "guests.d" / "105.conf") in message
    assert "qmp:" in message


def test_unregistered_guest_on_a_node_without_registry(tmp_path):
    with pytest.raises(GuestNotFound, match="registered guests: none"):
        load_guest(str(tmp_path), 105)


def test_list_guests_is_sorted_by_vmid_and_ignores_other_files(tmp_path):
    write_guest(tmp_path, 1000, "qmp: /c\n")
    write_guest(tmp_path, 200, "qmp: /b\n")
    write_guest(tmp_path, 100, "qmp: /a\n")
    guests = tmp_path / "guests.d"
    (guests / "200.conf.bak").write_text("garbage")
    (guests / "README").write_text("garbage")
    (guests / "web.conf").write_text("garbage")
    (guests / ".300.conf.swp").write_text("garbage")
    assert [entry.vmid for entry in list_guests(str(tmp_path))] == [100, 200, 1000]


def test_list_guests_without_registry_is_empty(tmp_path):
    assert list_guests(str(tmp_path)) == []


def test_list_guests_rejects_a_file_with_an_invalid_vmid(tmp_path):
    write_guest(tmp_path, "42", "qmp: /a\n")
    with pytest.raises(ConfigError, match="42.conf: '42' is not a valid vmid.*rename the file"):
        list_guests(str(tmp_path))


def test_rendered_entry_reads_back_identically(tmp_path):
    write_guest(tmp_path, 105, FULL)
    original = load_guest(str(tmp_path), 105)
    other = tmp_path / "other"
    other.mkdir()
    write_guest(other, 105, render_guest(original))
    assert load_guest(str(other), 105) == original


def test_rendered_minimal_entry_reads_back_identically(tmp_path):
    entry = GuestEntry(vmid=100, qmp_socket="/run/qemu/100.qmp", include=("virtio0",),
                       description="")
    write_guest(tmp_path, 100, render_guest(entry))
    assert load_guest(str(tmp_path), 100) == entry


def test_render_writes_key_value_lines():
    entry = GuestEntry(vmid=100, name="web", qmp_socket="/run/100.qmp", tags=("a", "b"))
    assert render_guest(entry) == "name: web\nqmp: /run/100.qmp\ntags: a;b\n"


def test_render_refuses_values_that_would_not_read_back():
    entry = GuestEntry(vmid=100, name="two\nlines", qmp_socket="/run/100.qmp")
    with pytest.raises(ConfigError, match="name"):
        render_guest(entry)
    with pytest.raises(ConfigError, match="tags"):
        render_guest(dataclasses.replace(entry, name="web", tags=("a;b",)))
    with pytest.raises(ConfigError, match="qmp"):
        render_guest(dataclasses.replace(entry, name="web", qmp_socket=""))
    with pytest.raises(ConfigError, match="description"):
        render_guest(dataclasses.replace(entry, name="web", description=" indented"))


def test_source_is_not_part_of_equality():
    a = GuestEntry(vmid=100, qmp_socket="/a", source="/etc/one")
    b = GuestEntry(vmid=100, qmp_socket="/a", source="/etc/two")
    assert a == b


LXC = """\
name: web
type: lxc
lxc: web
lxcpath: /srv/lxc
pool: production
mp1: /srv/logs,mp=/var/log/app
mp0: /srv/web-data,mp=/var/www,backup=1
"""


def test_a_container_entry_reads_and_renders_back(tmp_path):
    write_guest(tmp_path, 300, LXC)
    entry = load_guest(str(tmp_path), 300)
    assert (entry.type, entry.lxc, entry.lxcpath, entry.qmp_socket) == (
        "lxc", "web", "/srv/lxc", "")
    assert entry.mountpoints == (
        registry.MountPoint("mp0", "/srv/web-data", "/var/www", backup=True),
        registry.MountPoint("mp1", "/srv/logs", "/var/log/app", backup=False))
    assert entry.included_volumes == (("/var/www", "/srv/web-data"),)
    text = render_guest(entry)
    assert text == ("name: web\npool: production\ntype: lxc\nlxc: web\nlxcpath: /srv/lxc\n"
                    "mp0: /srv/web-data,mp=/var/www,backup=1\nmp1: /srv/logs,mp=/var/log/app\n")
    assert registry.parse_guest(text, 300, "x") == entry
    # lxcpath is optional (/var/lib/lxc)
    assert registry.parse_guest("type: lxc\nlxc: web\n", 300, "x").lxcpath is None


@pytest.mark.parametrize("text, message", [
    ("type: lxc\nlxcpath: /srv/lxc\n",
     r"300.conf: type lxc needs an 'lxc' line naming the container"),
    ("type: lxc\nlxc: web\nqmp: /run/q.qmp\n", r"qmp only apply to QEMU guests"),
    ("qmp: /run/q.qmp\nlxc: web\n", r"lxc only apply to LXC containers; add 'type: lxc'"),
    ("qmp: /run/q.qmp\nmp0: /srv,mp=/srv\n", r"mp0 only apply to LXC containers"),
    ("type: lxc\nlxc: web\nmp0: /srv\n", r"no mp=<path in the container>"),
    ("type: lxc\nlxc: web\nmp0: /srv,mp=/srv,size=8G\n", r"'size=8G' is not understood"),
    ("type: lxc\nlxc: web\nmp0: /srv,mp=/srv,backup=yes\n", r"backup=yes is not 0 or 1"),
    ("type: lxc\nlxc: web\nmp0: /srv,mp=/a/../etc\n", r"not an absolute path without"),
    ("type: lxc\nlxc: web\nmp0: srv,mp=/srv\n", r"not an absolute path without"),
    ("type: lxc\nlxc: web\nmp256: /srv,mp=/srv\n", r"unknown key 'mp256'"),
    ("type: lxc\nlxc: we/b\n", r"'we/b' is not an LXC container name"),
    ("type: lxc\nlxc: web\nlxcpath: lxc\n", r"'lxc' is not an absolute path"),
])
def test_bad_container_entries_name_the_file(tmp_path, text, message):
    write_guest(tmp_path, 300, text)
    with pytest.raises(ConfigError, match=message) as error:
        load_guest(str(tmp_path), 300)
    assert "300.conf" in str(error.value)


def test_render_refuses_a_container_entry_that_would_not_read_back():
    with pytest.raises(ConfigError, match="needs an 'lxc' line"):
        render_guest(GuestEntry(vmid=300, type="lxc"))
    with pytest.raises(ConfigError, match="repeat one"):
        render_guest(GuestEntry(vmid=300, type="lxc", lxc="web", mountpoints=(
            registry.MountPoint("mp0", "/a", "/a"), registry.MountPoint("mp0", "/b", "/b"))))
