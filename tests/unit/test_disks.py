"""Which of a guest's disks one backup takes (include, exclude, raw disks, UEFI flash)."""

import pytest

from guestvault_engine.guest.disks import Disk, select_disks
from guestvault_engine.errors import DiskSelectionError


def disk(disk_id, fmt='qcow2'):
    return Disk(id=disk_id, node=f"node-{disk_id}", format=fmt, virtual_size=1 << 30,
                filename=f"/images/{disk_id}.{fmt}", supports_bitmaps=fmt == 'qcow2',
                is_pflash=disk_id.startswith('pflash'))


GUEST = [disk('virtio0'), disk('virtio1'), disk('scsi0', 'raw'), disk('pflash0', 'raw'),
         disk('pflash1', 'raw')]


def ids(selected):
    return [d.id for d in selected]


def test_by_default_every_qcow2_disk_and_the_uefi_vars_are_taken_in_guest_order():
    selected, warnings = select_disks(GUEST)
    assert ids(selected) == ['virtio0', 'virtio1', 'pflash1']
    assert len(warnings) == 1


def test_raw_disks_are_skipped_with_a_warning_naming_include_raw():
    _selected, warnings = select_disks(GUEST)
    assert 'scsi0' in warnings[0] and 'raw' in warnings[0] and 'include_raw' in warnings[0]


def test_include_raw_takes_raw_disks_without_warning():
    selected, warnings = select_disks(GUEST, include_raw=True)
    assert ids(selected) == ['virtio0', 'virtio1', 'scsi0', 'pflash1']
    assert warnings == []


@pytest.mark.parametrize('include_raw', [False, True])
def test_uefi_vars_store_is_taken_and_firmware_code_never(include_raw):
    selected, _warnings = select_disks(GUEST, include_raw=include_raw)
    assert 'pflash1' in ids(selected)
    assert 'pflash0' not in ids(selected)


def test_uefi_vars_store_raises_no_raw_warning():
    _selected, warnings = select_disks([disk('virtio0'), disk('pflash1', 'raw')])
    assert warnings == []


def test_include_takes_only_the_named_disks():
    selected, warnings = select_disks(GUEST, include=['virtio1'])
    assert ids(selected) == ['virtio1']
    assert warnings == []  # disks left out on purpose need no warning


def test_exclude_leaves_out_the_named_disks():
    selected, _warnings = select_disks(GUEST, exclude=['virtio0'])
    assert ids(selected) == ['virtio1', 'pflash1']


def test_excluding_a_raw_disk_silences_its_warning():
    _selected, warnings = select_disks(GUEST, exclude=['scsi0'])
    assert warnings == []


@pytest.mark.parametrize('option', ['include', 'exclude'])
def test_unknown_disk_ids_are_refused_listing_the_guests_disks(option):
    with pytest.raises(DiskSelectionError) as err:
        select_disks(GUEST, **{option: ['virtio0', 'virtio9', 'ide3']})
    message = str(err.value)
    assert message.startswith(f"{option} names disk(s) ide3, virtio9 that the guest does not have")
    assert 'its disks are: pflash0, pflash1, scsi0, virtio0, virtio1' in message


def test_a_disk_both_included_and_excluded_is_refused():
    with pytest.raises(DiskSelectionError) as err:
        select_disks(GUEST, include=['virtio0', 'virtio1'], exclude=['virtio1'])
    assert 'virtio1' in str(err.value)
    assert 'both included and excluded' in str(err.value)


def test_nothing_left_is_an_error_listing_the_disks_and_formats():
    with pytest.raises(DiskSelectionError) as err:
        select_disks(GUEST, exclude=['virtio0', 'virtio1', 'pflash1'])
    message = str(err.value)
    assert 'no disk left to back up' in message
    assert 'virtio0 (qcow2)' in message and 'scsi0 (raw)' in message


def test_a_guest_with_only_raw_disks_has_nothing_to_take_by_default():
    with pytest.raises(DiskSelectionError):
        select_disks([disk('scsi0', 'raw')])
    selected, _warnings = select_disks([disk('scsi0', 'raw')], include_raw=True)
    assert ids(selected) == ['scsi0']


def test_a_guest_without_disks_has_nothing_to_take():
    with pytest.raises(DiskSelectionError) as err:
        select_disks([], include=['virtio0'])
    assert 'its disks are: none' in str(err.value)


def test_including_only_a_raw_disk_says_to_set_include_raw():
    with pytest.raises(DiskSelectionError) as err:
        select_disks(GUEST, include=['scsi0'])
    assert 'include_raw' in str(err.value)
