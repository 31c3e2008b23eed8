"""The level of the next backup, and which chain bitmaps a finished backup makes obsolete.

All on plain data: ``Disk`` objects with the bitmaps QEMU would report, and the ``ChainTip`` the
storage would report.
"""

from datetime import datetime, timedelta, timezone

import pytest

from guestvault_engine.policy import chain
from guestvault_engine.policy.chain import (ChainTip, LevelDecision, bitmap_name, bitmaps_to_retire,
                                            decide_level, parse_bitmap_name, validate_chain_name)
from guestvault_engine.guest.disks import Disk
from guestvault_engine.errors import ChainError, ConfigError

UTC = timezone.utc
NOW = datetime(2026, 3, 10, 1, 0, 0, tzinfo=UTC)
LAST = datetime(2026, 3, 9, 1, 0, 0, tzinfo=UTC)          # the chain's newest backup
START = datetime(2026, 3, 1, 1, 0, 0, tzinfo=UTC)         # the chain's full backup


def qcow2(disk_id, *bitmaps, node=None):
    """A bitmap-capable disk; ``bitmaps`` are names or dicts as query-block reports them."""
    return Disk(id=disk_id, node=node or f"node-{disk_id}", format='qcow2',
                virtual_size=1 << 30, filename=f"/images/{disk_id}.qcow2",
                supports_bitmaps=True,
                bitmaps=[b if isinstance(b, dict) else {'name': b} for b in bitmaps])


def raw(disk_id):
    return Disk(id=disk_id, node=f"node-{disk_id}", format='raw', virtual_size=1 << 20,
                filename=f"/images/{disk_id}.raw")


def tip(chain_name='nightly', backup_time=LAST, chain_start=START, disk_ids=('virtio0',),
        key_fingerprint=None):
    return ChainTip(backup_time=backup_time, chain=chain_name, chain_start=chain_start,
                    disk_ids=tuple(disk_ids), key_fingerprint=key_fingerprint)


def valid_disks(chain_name='nightly', since=LAST, ids=('virtio0',)):
    """Disks that carry exactly the bitmap the tip's incremental needs."""
    return [qcow2(i, bitmap_name(chain_name, since)) for i in ids]


# ----------------------------------------------------------------------------- bitmap names

def test_bitmap_name_says_chain_and_the_backup_it_counts_from():
    assert bitmap_name('nightly', LAST) == 'guestvault.nightly.20260309T010000Z'


def test_bitmap_name_stamps_in_utc_whatever_the_zone_of_the_time():
    local = LAST.astimezone(timezone(timedelta(hours=2)))
    assert bitmap_name('nightly', local) == bitmap_name('nightly', LAST)


@pytest.mark.parametrize('chain_name', ['nightly', 'a', 'Weekly-2_b', chain.stamp(NOW)])
def test_bitmap_name_and_parse_bitmap_name_round_trip(chain_name):
    assert parse_bitmap_name(bitmap_name(chain_name, LAST)) == (chain_name, '20260309T010000Z')


@pytest.mark.parametrize('name', [
    'qmpbackup-virtio0-20260309',      # another tool's
    'backup-bitmap',
    'guestvault',
    'guestvault.nightly',              # too few parts
    'guestvault.nightly.x.y',          # too many parts
    'other.nightly.20260309T010000Z',  # someone else's prefix
])
def test_other_bitmaps_are_not_ours(name):
    assert parse_bitmap_name(name) is None


def test_generated_chains_are_time_stamps_and_never_clash_with_named_ones():
    generated = chain.stamp(NOW)
    assert generated == '20260310T010000Z'
    assert chain.is_generated_chain(generated)
    assert not chain.is_generated_chain('nightly')
    with pytest.raises(ConfigError):
        validate_chain_name(generated)


# ----------------------------------------------------------------------------- chain names

@pytest.mark.parametrize('name', ['nightly', 'N', 'weekly_2', 'a-b', 'x' * 64])
def test_valid_chain_names(name):
    assert validate_chain_name(name) == name


@pytest.mark.parametrize('name', [
    '', None, '2026', '-nightly', '_nightly', 'night.ly', 'night ly', 'nightly/x', 'x' * 65,
    'nächt',
])
def test_invalid_chain_names_are_refused_with_the_rule(name):
    with pytest.raises(ConfigError) as err:
        validate_chain_name(name)
    assert 'not a valid chain name' in str(err.value)
    assert 'starting with a letter' in str(err.value)


def test_chain_name_with_trailing_newline_is_refused():
    with pytest.raises(ConfigError):
        validate_chain_name('nightly\n')


def test_decide_level_refuses_an_invalid_chain_name_before_deciding():
    with pytest.raises(ConfigError) as err:
        decide_level('full', NOW, valid_disks(), None, chain_name='bad.name')
    assert "'bad.name'" in str(err.value)


# ----------------------------------------------------------------------------- decide_level

def test_copy_is_a_full_backup_outside_any_chain():
    decision = decide_level('copy', NOW, valid_disks(), tip())
    assert decision.level == 'copy'
    assert decision.chain is None and decision.parent is None
    assert not decision.fallback
    assert 'copy' in decision.reason


def test_copy_ignores_the_chain_name_for_the_decision():
    decision = decide_level('copy', NOW, valid_disks(), tip(), chain_name='nightly')
    assert decision.level == 'copy' and decision.chain is None


def test_full_with_a_chain_name_starts_that_chain():
    decision = decide_level('full', NOW, valid_disks(), tip(), chain_name='weekly')
    assert decision == LevelDecision('full', chain='weekly', reason='full requested')


def test_full_without_a_chain_name_starts_a_chain_named_after_its_time():
    decision = decide_level('full', NOW, valid_disks(), tip())
    assert decision.level == 'full'
    assert decision.chain == '20260310T010000Z'
    assert decision.parent is None and not decision.fallback


def test_full_is_taken_even_when_the_chain_could_continue():
    decision = decide_level('full', NOW, valid_disks(), tip(), chain_name='nightly')
    assert decision.level == 'full' and decision.chain == 'nightly'


@pytest.mark.parametrize('requested', ['inc', 'auto'])
def test_a_valid_chain_is_continued(requested):
    decision = decide_level(requested, NOW, valid_disks(), tip(), chain_name='nightly')
    assert decision.level == 'inc'
    assert decision.chain == 'nightly'
    assert decision.parent == LAST
    assert not decision.fallback
    assert 'continues chain nightly' in decision.reason
    assert decision.as_dict()['parent'] == '2026-03-09T01:00:00Z'


def test_the_newest_unnamed_chain_is_continued_without_a_chain_name():
    generated = chain.stamp(START)
    decision = decide_level('auto', NOW, valid_disks(generated), tip(generated))
    assert decision.level == 'inc' and decision.chain == generated


def test_raw_disks_do_not_stop_an_incremental():
    disks = valid_disks() + [raw('virtio1')]
    decision = decide_level('inc', NOW, disks, tip())
    assert decision.level == 'inc'


def test_chain_period_monthly_continues_within_the_month():
    decision = decide_level('auto', NOW, valid_disks(), tip(), chain_period='monthly')
    assert decision.level == 'inc'


# Each way a chain can be broken: (disks, tip, words the reason must contain).
BROKEN = {
    'no tip': (valid_disks(), None, ['no earlier backup']),
    'new month': (
        valid_disks(since=datetime(2026, 2, 28, 23, 0, tzinfo=UTC)),
        tip(backup_time=datetime(2026, 2, 28, 23, 0, tzinfo=UTC),
            chain_start=datetime(2026, 2, 1, 1, 0, tzinfo=UTC)),
        ['monthly', '2026-02', 'new month']),
    'disk set changed': (
        valid_disks(ids=('virtio0', 'virtio1')), tip(disk_ids=('virtio0',)),
        ['virtio0, virtio1', 'differ', 'virtio0']),
    'bitmap missing': (
        [qcow2('virtio0', 'qmpbackup-virtio0')], tip(),
        ['virtio0', 'no bitmap guestvault.nightly.20260309T010000Z', 'removed']),
    'bitmap of another backup': (
        [qcow2('virtio0', bitmap_name('nightly', datetime(2026, 3, 8, 1, tzinfo=UTC)))], tip(),
        ['guestvault.nightly.20260308T010000Z', '2026-03-09T01:00:00Z', 'removed',
         'another storage']),
    'inconsistent bitmap': (
        [qcow2('virtio0', {'name': bitmap_name('nightly', LAST), 'inconsistent': True})], tip(),
        ['guestvault.nightly.20260309T010000Z', 'virtio0', 'inconsistent']),
    'no bitmap-capable disk': (
        [raw('virtio0')], tip(), ['none of the selected disks', 'qcow2']),
}


def _period(case):
    return 'monthly' if case == 'new month' else 'none'


@pytest.mark.parametrize('case', BROKEN)
def test_auto_falls_back_to_a_full_backup_and_says_why(case):
    disks, chain_tip, words = BROKEN[case]
    decision = decide_level('auto', NOW, disks, chain_tip, chain_name='nightly',
                            chain_period=_period(case))
    assert decision.level == 'full'
    assert decision.fallback is True
    assert decision.chain == 'nightly'
    assert decision.parent is None
    assert decision.reason.startswith('auto: full because ')
    for word in words:
        assert word in decision.reason


# chain_period needs level auto, so a new month cannot break an inc request.
@pytest.mark.parametrize('case', [case for case in BROKEN if case != 'new month'])
def test_inc_refuses_with_the_reason_and_what_to_do(case):
    disks, chain_tip, words = BROKEN[case]
    with pytest.raises(ChainError) as err:
        decide_level('inc', NOW, disks, chain_tip, chain_name='nightly')
    message = str(err.value)
    assert message.startswith('cannot take an incremental backup: ')
    for word in words:
        assert word in message
    assert 'level: full' in message and 'level: auto' in message


KEY_A = ':'.join(['aa'] * 32)
KEY_B = ':'.join(['bb'] * 32)


@pytest.mark.parametrize('requested', ['auto', 'inc'])
@pytest.mark.parametrize('before, now, words', [
    (KEY_A, KEY_B, f"made with key {KEY_A[:23]}, this backup uses key {KEY_B[:23]}"),
    (None, KEY_A, f"made with no key, this backup uses key {KEY_A[:23]}"),
    (KEY_A, None, f"made with key {KEY_A[:23]}, this backup uses no key"),
])
def test_another_key_than_the_chains_starts_a_new_full_with_a_warning(requested, before, now,
                                                                      words):
    d = decide_level(requested, NOW, valid_disks(), tip(key_fingerprint=before),
                     key_fingerprint=now)
    assert (d.level, d.chain, d.parent, d.fallback) == ('full', chain.stamp(NOW), None, True)
    assert d.reason.startswith(f"{requested}: full because the encryption key changed: backup "
                               "2026-03-09T01:00:00Z of chain nightly ")
    assert words in d.reason
    (warning,) = d.warnings
    assert words in warning and warning.endswith(f"starting chain {chain.stamp(NOW)}")


def test_the_same_key_continues_the_chain():
    d = decide_level('auto', NOW, valid_disks(), tip(key_fingerprint=KEY_A),
                     key_fingerprint=KEY_A)
    assert (d.level, d.parent, d.warnings) == ('inc', LAST, [])


def test_monthly_period_begins_a_new_chain_across_the_new_year():
    end_of_year = datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC)
    chain_tip = tip(backup_time=end_of_year, chain_start=datetime(2025, 12, 1, tzinfo=UTC))
    decision = decide_level('auto', datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC),
                            valid_disks(since=end_of_year), chain_tip, chain_name='nightly',
                            chain_period='monthly')
    assert decision.level == 'full' and decision.fallback
    assert '2025-12' in decision.reason


def test_monthly_period_compares_the_month_not_only_its_number():
    # Same month number a year later is a new month too.
    chain_tip = tip(backup_time=LAST, chain_start=datetime(2025, 3, 1, tzinfo=UTC))
    decision = decide_level('auto', NOW, valid_disks(), chain_tip, chain_period='monthly')
    assert decision.level == 'full' and '2025-03' in decision.reason


def test_a_missing_bitmap_on_one_of_several_disks_breaks_the_chain():
    disks = [qcow2('virtio0', bitmap_name('nightly', LAST)), qcow2('virtio1')]
    decision = decide_level('auto', NOW, disks, tip(disk_ids=('virtio0', 'virtio1')))
    assert decision.level == 'full' and 'virtio1' in decision.reason


@pytest.mark.parametrize('level', ['full', 'inc', 'copy'])
def test_chain_period_with_another_level_than_auto_is_a_config_error(level):
    with pytest.raises(ConfigError) as err:
        decide_level(level, NOW, valid_disks(), tip(), chain_period='monthly')
    assert 'chain_period monthly' in str(err.value) and 'level auto' in str(err.value)


def test_unknown_level_and_chain_period_are_config_errors_listing_the_choices():
    with pytest.raises(ConfigError) as err:
        decide_level('differential', NOW, valid_disks(), tip())
    assert 'full, inc, auto, copy' in str(err.value)
    with pytest.raises(ConfigError) as err:
        decide_level('auto', NOW, valid_disks(), tip(), chain_period='weekly')
    assert 'none, monthly' in str(err.value)


# ----------------------------------------------------------------------------- bitmaps_to_retire

def _names(retired):
    return sorted(name for _node, name in retired)


OTHER_TOOL = 'qmpbackup-virtio0-1'
OLD_GENERATED = bitmap_name(chain.stamp(START), LAST)
OLDER_GENERATED = bitmap_name('20260201T010000Z', datetime(2026, 2, 2, tzinfo=UTC))
NIGHTLY = bitmap_name('nightly', LAST)
NIGHTLY_LEFTOVER = bitmap_name('nightly', datetime(2026, 3, 5, tzinfo=UTC))
WEEKLY = bitmap_name('weekly', LAST)


def _all_bitmaps(new):
    return [qcow2('virtio0', OTHER_TOOL, OLD_GENERATED, OLDER_GENERATED, NIGHTLY,
                  NIGHTLY_LEFTOVER, WEEKLY, new)]


def test_full_of_a_named_chain_retires_that_chains_bitmaps_only():
    decision = LevelDecision('full', chain='nightly')
    new = bitmap_name('nightly', NOW)
    retired = bitmaps_to_retire(_all_bitmaps(new), decision, NOW)
    assert _names(retired) == sorted([NIGHTLY, NIGHTLY_LEFTOVER])


def test_unnamed_full_retires_every_generated_chain_but_no_named_one():
    generated = chain.stamp(NOW)
    decision = LevelDecision('full', chain=generated)
    new = bitmap_name(generated, NOW)
    retired = bitmaps_to_retire(_all_bitmaps(new), decision, NOW)
    assert _names(retired) == sorted([OLD_GENERATED, OLDER_GENERATED])


def test_inc_retires_its_parents_bitmap_and_leftovers_of_its_chain():
    decision = LevelDecision('inc', chain='nightly', parent=LAST)
    new = bitmap_name('nightly', NOW)
    retired = bitmaps_to_retire(_all_bitmaps(new), decision, NOW)
    assert _names(retired) == sorted([NIGHTLY, NIGHTLY_LEFTOVER])


def test_inc_of_an_unnamed_chain_leaves_other_generated_chains_alone():
    generated = chain.stamp(START)
    decision = LevelDecision('inc', chain=generated, parent=LAST)
    new = bitmap_name(generated, NOW)
    retired = bitmaps_to_retire(_all_bitmaps(new), decision, NOW)
    assert _names(retired) == [OLD_GENERATED]


@pytest.mark.parametrize('decision', [
    LevelDecision('full', chain='nightly'),
    LevelDecision('full', chain=chain.stamp(NOW)),
    LevelDecision('inc', chain='nightly', parent=LAST),
    LevelDecision('copy'),
])
def test_the_new_bitmap_and_other_tools_bitmaps_are_never_retired(decision):
    new = bitmap_name(decision.chain, NOW) if decision.chain else None
    disks = _all_bitmaps(new or 'unrelated')
    retired = _names(bitmaps_to_retire(disks, decision, NOW))
    assert OTHER_TOOL not in retired and 'unrelated' not in retired
    assert new not in retired


def test_copy_retires_nothing():
    assert bitmaps_to_retire(_all_bitmaps('x'), LevelDecision('copy'), NOW) == []


def test_retired_bitmaps_are_named_with_their_disks_node():
    disks = [qcow2('virtio0', NIGHTLY, node='drive-a'), qcow2('virtio1', NIGHTLY, node='drive-b'),
             raw('virtio2')]
    retired = bitmaps_to_retire(disks, LevelDecision('inc', chain='nightly', parent=LAST), NOW)
    assert sorted(retired) == [('drive-a', NIGHTLY), ('drive-b', NIGHTLY)]


# ----------------------------------------------------------------------------- the chain tip

def stored(time, chain_name, level='inc', chain_start='2026-03-01T01:00:00Z', disks=('virtio0',)):
    """A backup as the storage lists it (only what chain_tip reads)."""
    from guestvault_engine.storage.base import BackupRecord
    return BackupRecord(f'/s/{time}', {
        'time': time, 'vmid': 100, 'level': level, 'chain': chain_name,
        'chain_start': chain_start,
        'disks': [{'id': d, 'bitmap': f'b-{d}' if d.startswith('virtio') else None}
                  for d in disks]}, False)


def test_the_tip_is_the_newest_backup_of_the_newest_chain_unless_a_chain_is_named():
    backups = [stored('2026-03-01T01:00:00Z', 'nightly', 'full'),
               stored('2026-03-02T01:00:00Z', 'weekly', 'full',
                      chain_start='2026-03-02T01:00:00Z'),
               stored('2026-03-03T01:00:00Z', 'nightly')]
    newest = chain.chain_tip(backups)
    assert (newest.chain, newest.backup_time) == ('nightly', datetime(2026, 3, 3, 1, tzinfo=UTC))
    assert newest.chain_start == START
    weekly = chain.chain_tip(backups, 'weekly')
    assert (weekly.chain, weekly.backup_time) == ('weekly', datetime(2026, 3, 2, 1, tzinfo=UTC))
    assert chain.chain_tip(backups, 'monthly') is None
    assert chain.chain_tip([]) is None


def test_copies_never_continue_a_chain_and_only_bitmap_disks_count():
    backups = [stored('2026-03-01T01:00:00Z', 'nightly', 'full', disks=('virtio0', 'pflash1')),
               stored('2026-03-04T01:00:00Z', None, 'copy')]
    newest = chain.chain_tip(backups)
    assert newest.backup_time == datetime(2026, 3, 1, 1, tzinfo=UTC)
    assert newest.disk_ids == ('virtio0',)


def test_one_rule_says_why_a_chain_cannot_continue():
    """chain_problem is what guest_info's can_continue and the level decision both use."""
    good = tip()
    disks = [qcow2('virtio0', bitmap_name('nightly', LAST))]
    assert chain.chain_problem(good, disks, 'none', NOW) is None
    assert 'differ' in chain.chain_problem(good, disks + [qcow2('virtio1')], 'none', NOW)
    assert 'monthly' in chain.chain_problem(good, disks, 'monthly',
                                            datetime(2026, 4, 1, tzinfo=UTC))
    assert 'qcow2 v3' in chain.chain_problem(good, [raw('virtio0')], 'none', NOW)
