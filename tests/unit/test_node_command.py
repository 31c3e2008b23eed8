"""The node command's pure parts: which guests a run selects, and a job's settings."""
import pytest

from guestvault_engine.errors import ConfigError
from guestvault_engine.run.node_command import _job_settings, build_parser, select_guests


@pytest.fixture
def config_dir(tmp_path):
    guests = tmp_path / 'guests.d'
    guests.mkdir()
    for vmid, pool in ((101, 'web'), (102, 'web'), (103, None), (150, 'db')):
        (guests / f'{vmid}.conf').write_text(f"qmp: /run/qemu/{vmid}.qmp\n"
                                             + (f"pool: {pool}\n" if pool else ''))
    (tmp_path / 'jobs.cfg').write_text(
        "vzdump: nightly\n\tschedule mon..fri 23:00\n\tpool web\n\texclude 102\n"
        "\tstorage backup\n\tmode suspend\n\tchain-period monthly\n\tnode node1,node2\n\n"
        "vzdump: every\n\tschedule sun 01:00\n\tall 1\n\tenabled 0\n")
    return str(tmp_path)


def settings(config_dir, *argv):
    args = build_parser().parse_args(list(argv) + ['--config-dir', config_dir])
    return args, _job_settings(args)


def selection(config_dir, **given):
    base = {'vmid': [], 'all': False, 'pool': None, 'exclude': []}
    return select_guests(config_dir, dict(base, **given))


def test_all_selects_every_registered_guest_in_vmid_order_less_the_excluded(config_dir):
    assert selection(config_dir, all=True) == [101, 102, 103, 150]
    assert selection(config_dir, all=True, exclude=[102, 150]) == [101, 103]


def test_a_pool_selects_its_guests_and_vmids_are_taken_as_given(config_dir):
    assert selection(config_dir, pool='web') == [101, 102]
    assert selection(config_dir, vmid=[150, 101]) == [150, 101]


@pytest.mark.parametrize('given, words', [
    ({}, 'no guests selected'),
    ({'vmid': [101], 'exclude': [101]}, 'both selected and excluded'),
    ({'pool': 'web', 'exclude': [101, 102]}, 'leaves no guest'),
    ({'pool': 'nobody'}, 'leaves no guest'),
])
def test_a_selection_that_names_nobody_is_refused(config_dir, given, words):
    with pytest.raises(ConfigError, match=words):
        selection(config_dir, **given)


def test_a_job_gives_its_settings_and_flags_override_them(config_dir):
    _args, job = settings(config_dir, '--job', 'nightly')
    assert (job['pool'], job['exclude'], job['storage'], job['mode']) == (
        'web', [102], 'backup', 'suspend')
    assert job['chain_period'] == 'monthly'
    assert job['job'].runs_on('node1') and not job['job'].runs_on('node3')
    assert select_guests(config_dir, job) == [101]
    _args, flagged = settings(config_dir, '--job', 'nightly', '--mode', 'stop',
                              '--chain-period', 'none', '--exclude', '101')
    assert (flagged['mode'], flagged['chain_period'], flagged['exclude']) == ('stop', 'none', [101])


def test_a_disabled_job_and_an_unknown_job(config_dir):
    _args, job = settings(config_dir, '--job', 'every')
    assert job['all'] is True and job['job'].enabled is False
    with pytest.raises(ConfigError, match="no job 'weekly' .* jobs: every, nightly"):
        settings(config_dir, '--job', 'weekly')
