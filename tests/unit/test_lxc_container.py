"""Container.freeze (guest/lxc/container.py) against stand-in lxc-* commands on PATH that keep
the container's freezer state in a file: the second test beside the real containers of
tests/integration/test_lxc_kind.py, which cannot make a freeze slow on purpose.

On a cgroup v1 freezer, LXC 5's lxc-freeze sleeps a whole second when its first read of the
state still says FREEZING (bench/container_bench.py measured suspend mode frozen for 1.5 s
instead of 0.5 s with a writer in the container), so freeze sets the freezer through lxc-cgroup
and reads the state itself until it is no longer FREEZING; lxc-freeze only where there is no v1
freezer (cgroup v2), where it waits on the kernel's event."""
import os
import stat

import pytest

from guestvault_engine.errors import ContainerError
from guestvault_engine.guest.lxc.container import Container

TOOLS = {
    # LXC's record of the state (lxc-info goes by it, not by the cgroup)
    'lxc-info': 'cat "$LAB/record"\n',
    # the v1 freezer: set, or read (a freezing container is FROZEN from the third read on);
    # without one (cgroup v2) lxc-cgroup fails
    'lxc-cgroup': """
if [ -e "$LAB/v2" ]; then echo "lxc-cgroup: No such cgroup file freezer.state" >&2; exit 1; fi
if [ $# -eq 6 ]; then
  if [ "$6" = FROZEN ]; then echo FREEZING; else echo "$6"; fi > "$LAB/freezer"; exit 0
fi
state=$(cat "$LAB/freezer")
if [ "$state" = FREEZING ]; then
  reads=$(($(cat "$LAB/reads" 2>/dev/null || echo 0) + 1)); echo $reads > "$LAB/reads"
  [ $reads -ge 3 ] && echo FROZEN > "$LAB/freezer"
fi
echo "$state"
""",
    # the real one sleeps a second when the freezer is not FROZEN on its first read: noted
    'lxc-freeze': """
[ "$(cat "$LAB/freezer")" = FROZEN ] || echo "lxc-freeze-waits" >> "$LAB/calls"
echo FROZEN > "$LAB/freezer"; echo FROZEN > "$LAB/record"
""",
    # goes by the record
    'lxc-unfreeze': """
[ "$(cat "$LAB/record")" = FROZEN ] && echo THAWED > "$LAB/freezer"; echo RUNNING > "$LAB/record"
""",
}


@pytest.fixture
def lab(tmp_path, monkeypatch):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name, body in TOOLS.items():
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\necho "{name} $*" >> "$LAB/calls"\n{body}')
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    (tmp_path / 'record').write_text('RUNNING\n')
    (tmp_path / 'freezer').write_text('THAWED\n')
    monkeypatch.setenv('LAB', str(tmp_path))
    monkeypatch.setenv('PATH', f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def calls(lab):
    return [line.split()[0] for line in (lab / 'calls').read_text().splitlines()]


def test_a_v1_freezer_is_set_and_read_until_frozen_before_lxc_freeze_records_it(lab):
    Container('web', '/var/lib/lxc').freeze()
    assert (lab / 'calls').read_text().splitlines()[0] == \
        'lxc-cgroup -P /var/lib/lxc -n web freezer.state FROZEN'
    # read while FREEZING (3 times) and once FROZEN; lxc-freeze finds it frozen and does not
    # wait; the check
    assert calls(lab) == ['lxc-cgroup'] * 5 + ['lxc-freeze', 'lxc-info']
    assert (lab / 'freezer').read_text() == (lab / 'record').read_text() == 'FROZEN\n'


def test_without_a_v1_freezer_lxc_freeze_freezes(lab):
    (lab / 'v2').touch()
    Container('web', '/var/lib/lxc').freeze()
    assert calls(lab) == ['lxc-cgroup', 'lxc-freeze', 'lxc-freeze-waits', 'lxc-info']
    assert (lab / 'record').read_text() == 'FROZEN\n'


def test_a_container_that_does_not_freeze_is_an_error(lab):
    (lab / 'v2').touch()
    (lab / 'bin' / 'lxc-freeze').write_text('#!/bin/sh\necho "lxc-freeze: stopped" >&2\n'
                                            'exit 1\n')
    with pytest.raises(ContainerError, match=r"container web could not be frozen: it is "
                       r"RUNNING \(lxc-freeze: stopped\)"):
        Container('web', '/var/lib/lxc').freeze()


def test_thaw_undoes_a_freeze_cut_short_before_lxc_knew_of_it(lab):
    container = Container('web', '/var/lib/lxc')
    container.freeze()
    container.thaw()
    assert (lab / 'freezer').read_text() == 'THAWED\n'
    # frozen through the cgroup, LXC's record still RUNNING (a signal before lxc-freeze)
    (lab / 'freezer').write_text('FROZEN\n')
    container.thaw()
    assert (lab / 'freezer').read_text() == 'THAWED\n'
    assert (lab / 'record').read_text() == 'RUNNING\n'
