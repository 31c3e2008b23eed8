"""jobs.cfg: Proxmox syntax parsed, validated and written back."""
import pytest

from guestvault_engine.errors import ConfigError
from guestvault_engine.policy.jobs_cfg import Job, parse_jobs_cfg, render_jobs_cfg, validate_job

JOBS = """# nightly backups
vzdump: weeknights
\tschedule mon..fri 23:00
\tall 1
\texclude 105,106
\tstorage backup-nfs
\tmode snapshot
\tprune-backups keep-daily=3,keep-weekly=2,keep-monthly=1
\trepeat-missed 1
\tnotes-template {{guestname}} nightly

vzdump: sunday
\tschedule sun 01:00
\tvmid 101,102
\tlevel full
\tnode node1,node2
\tenabled 0
"""


def test_a_jobs_cfg_reads_into_typed_options():
    jobs = parse_jobs_cfg(JOBS, '/etc/guestvault/jobs.cfg')
    nightly = jobs['weeknights'].options
    assert nightly['all'] is True and nightly['exclude'] == [105, 106]
    assert nightly['prune-backups'] == {'keep-daily': 3, 'keep-weekly': 2, 'keep-monthly': 1}
    assert nightly['repeat-missed'] is True and jobs['weeknights'].enabled
    sunday = jobs['sunday']
    assert sunday.options['vmid'] == [101, 102] and not sunday.enabled
    assert sunday.runs_on('node2') and not sunday.runs_on('node3')
    assert jobs['weeknights'].runs_on('anything')


def test_rendering_reads_back_the_same():
    jobs = parse_jobs_cfg(JOBS, 'jobs.cfg')
    again = parse_jobs_cfg(render_jobs_cfg(jobs), 'jobs.cfg')
    assert {k: v.options for k, v in again.items()} == {k: v.options for k, v in jobs.items()}
    text = render_jobs_cfg(jobs)
    assert text.splitlines()[0] == 'vzdump: sunday'
    assert text.splitlines()[1] == '\tschedule sun 01:00'


@pytest.mark.parametrize('raw, words', [
    ({'vmid': '101'}, 'needs a schedule'),
    ({'schedule': 'daily'}, 'selects no guest'),
    ({'schedule': 'daily', 'vmid': '101', 'exclude': '101'}, 'both in vmid and in exclude'),
    ({'schedule': 'daily', 'vmid': '101', 'all': '1'}, 'do not combine'),
    ({'schedule': 'daily', 'vmid': '99'}, 'not a vmid'),
    ({'schedule': 'mon..funday 23:00', 'vmid': '101'}, 'schedule'),
    ({'schedule': 'daily', 'vmid': '101', 'storage': 'nfs', 'dumpdir': '/b'}, 'mutually exclusive'),
    ({'schedule': 'daily', 'vmid': '101', 'colour': 'blue'}, "unknown option 'colour'"),
    ({'schedule': 'daily', 'vmid': '101', 'prune-backups': 'keep-last=-1'}, 'keep-last'),
    ({'schedule': 'daily', 'vmid': '101', 'mode': 'pause'}, 'mode'),
])
def test_a_bad_job_says_what_to_fix(raw, words):
    with pytest.raises(ConfigError) as err:
        validate_job('nightly', raw, 'job nightly')
    assert words in str(err.value)


def test_a_bad_job_id_and_a_duplicate_job_are_refused():
    with pytest.raises(ConfigError, match='job id'):
        validate_job('9lives', {'schedule': 'daily', 'vmid': '101'})
    with pytest.raises(ConfigError, match='defined twice'):
        parse_jobs_cfg("vzdump: a\n\tschedule daily\n\tall 1\n\nvzdump: a\n\tschedule daily\n"
                       "\tall 1\n", 'jobs.cfg')
    with pytest.raises(ConfigError, match="unknown job type 'sync'"):
        parse_jobs_cfg("sync: a\n\tschedule daily\n", 'jobs.cfg')


def test_a_job_object_defaults_to_enabled_everywhere():
    job = Job('x', {'schedule': 'daily', 'all': True})
    assert job.enabled and job.runs_on('node9')
