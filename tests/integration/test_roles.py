"""The node and backup_schedule roles as users run them: ansible-playbook against localhost, every
path of the node (configuration, units, engine, command) in a scratch directory, apt and pip
skipped; plus the guest_registry and schedule_info modules they and users rely on."""
import os
import re
import shutil
import socket
import subprocess
import sys
import zipfile

import pytest
import yaml

from ansible_runner import BIN, PYTHON, ROOT, assert_failed_with
from procs import run_bounded
from guestvault_engine.run.backup_job import apply_job
from guestvault_engine.policy.jobs_cfg import load_jobs
from guestvault_engine.guest.registry import list_guests, load_guest

PLAYBOOKS = ROOT / 'playbooks'
BUILD_ENGINE = ROOT / 'roles' / 'node' / 'files' / 'build_engine.py'
ENGINE_SOURCE = ROOT / 'plugins' / 'module_utils' / '_engine'
POLICY = 'keep-daily=3,keep-weekly=2,keep-monthly=1'
GUESTS = [
    {'vmid': 101, 'name': 'web01', 'qmp': '/run/qemu/101.qmp', 'agent': '/run/qemu/101.qga',
     'pool': 'production', 'tags': ['web', 'critical'], 'exclude': ['virtio2']},
    {'vmid': 102, 'qmp': '/run/qemu/102.qmp', 'start': 'systemctl start qemu@102',
     'description': 'Mail server.\nIts scratch disk is not backed up.'},
    {'vmid': 300, 'type': 'lxc', 'lxc': 'web', 'mountpoints': {
        'mp0': '/srv/web-data,mp=/var/www,backup=1'}},
]
JOBS = [
    {'id': 'weeknights', 'schedule': 'mon..fri 23:00', 'all': True, 'storage': 'backup',
     'mode': 'snapshot', 'prune_backups': POLICY, 'repeat_missed': True},
    {'id': 'here', 'schedule': 'sun 01:00', 'vmid': [101], 'node': [socket.gethostname()],
     'storage': 'backup'},
    {'id': 'elsewhere', 'schedule': 'sun 02:00', 'vmid': [103], 'node': ['othernode'],
     'storage': 'backup'},
]
# backup_schedule's jobs name storages, which vzdump_config defines first (as in site.yml).
SCHEDULE_ROLES = ('vzdump_config', 'backup_schedule')


@pytest.fixture(scope='module')
def collections(tmp_path_factory, installed_collection):
    """A private copy of the installed collection: another `make collection` during the test
    must not change the files the roles copy between two runs."""
    root = tmp_path_factory.mktemp('collections')
    shutil.copytree(installed_collection, root / 'ansible_collections' / 'guestvault' / 'backup',
                    ignore=shutil.ignore_patterns('__pycache__'))
    return str(root)


class Node:
    """A node whose every path lies under ``base``; ``converge(...)`` runs the roles on it."""

    def __init__(self, base, collections):
        self.base = base
        self.collections = collections
        self.config_dir = os.path.join(base, 'etc', 'guestvault')
        self.unit_dir = os.path.join(base, 'etc', 'systemd', 'system')
        self.engine_archive = os.path.join(base, 'usr', 'lib', 'guestvault', 'guestvault-engine.pyz')
        # The controller's scratch space (TMPDIR of ansible-playbook): the engine's build goes there.
        self.controller_tmp = os.path.join(base, 'controller-tmp')
        self.sbin_dir = os.path.join(base, 'usr', 'local', 'sbin')
        self.command = os.path.join(self.sbin_dir, 'guestvault-dump')
        self.runs = 0

    def variables(self, **extra):
        return dict({
            'guestvault_config_dir': self.config_dir,
            'guestvault_unit_dir': self.unit_dir,
            'guestvault_engine_archive': self.engine_archive,
            'guestvault_sbin_dir': self.sbin_dir,
            'guestvault_install_packages': False,
            'guestvault_install_python_deps': False,
            # The storages the jobs name: backup_job refuses a storage storage.cfg lacks.
            'guestvault_storages': {name: {'path': os.path.join(self.base, name)}
                                    for name in ('backup', 'backup-nfs')},
        }, **extra)

    def converge(self, roles=('node', 'vzdump_config', 'backup_schedule'), check=False, playbook=None, **extra):
        """Run the roles (or a playbook of the collection with the node's paths as extra vars);
        (return code, output, recap dict of localhost)."""
        self.runs += 1
        variables = self.variables(**extra)
        if playbook:
            path = os.path.join(self.base, f'vars-{self.runs}.yml')
            with open(path, 'w') as handle:
                yaml.safe_dump(variables, handle)
            play_args = ['-e', f'@{path}', '-e', 'guestvault_nodes=localhost',
                         '-e', 'ansible_become=false', str(PLAYBOOKS / playbook)]
        else:
            play = [{'name': 'Converge', 'hosts': 'localhost', 'gather_facts': False,
                     'vars': variables,
                     'roles': [f'guestvault.backup.{role}' for role in roles]}]
            path = os.path.join(self.base, f'play-{self.runs}.yml')
            with open(path, 'w') as handle:
                yaml.safe_dump(play, handle, sort_keys=False)
            play_args = [path]
        os.makedirs(self.controller_tmp, exist_ok=True)
        env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=self.collections, ANSIBLE_NOCOLOR='1',
                   TMPDIR=self.controller_tmp,
                   ANSIBLE_LOCALHOST_WARNING='0', ANSIBLE_INVENTORY_UNPARSED_WARNING='0',
                   ANSIBLE_STDOUT_CALLBACK='default', ANSIBLE_RETRY_FILES_ENABLED='0')
        env.pop('ANSIBLE_CONFIG', None)
        argv = [str(BIN / 'ansible-playbook'), '-i', 'localhost,', '-c', 'local',
                '-e', f'ansible_python_interpreter={PYTHON}', *play_args]
        argv += ['--check', '--diff'] if check else []
        try:
            # A converge took up to 27 s on a busy day here (and speed varies 3x between days):
            # the limit only stops a hung one, and its whole process tree.
            proc = run_bounded(argv, 600, cwd=self.base, env=env, capture_output=True, text=True)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"{' '.join(argv)}: still running after 600 s, its processes killed; "
                        f"output so far:\n{exc.output or ''}{exc.stderr or ''}")
        output = proc.stdout + proc.stderr
        match = re.search(r'^localhost\s*:\s*(.*)$', output, re.MULTILINE)
        recap = {k: int(v) for k, v in re.findall(r'(\w+)=(\d+)', match.group(1))} if match else {}
        return proc.returncode, output, recap

    def units(self):
        return sorted(os.listdir(self.unit_dir)) if os.path.isdir(self.unit_dir) else []


@pytest.fixture
def node(tmp_path, collections):
    base = tmp_path / 'node'
    base.mkdir()
    return Node(str(base), collections)


def converged(node, **extra):
    rc, output, recap = node.converge(**extra)
    assert rc == 0 and recap.get('failed') == 0, output
    assert os.listdir(node.controller_tmp) == [], 'the engine build stays behind on the controller'
    return output, recap


@pytest.fixture(scope='module')
def deployed(tmp_path_factory, collections):
    """One node converged twice with GUESTS and JOBS: (node, first recap, second run)."""
    node = Node(str(tmp_path_factory.mktemp('deployed')), collections)
    first = converged(node, guestvault_guests=GUESTS, guestvault_jobs=JOBS)[1]
    second = converged(node, guestvault_guests=GUESTS, guestvault_jobs=JOBS)
    return node, first, second


def test_roles_converge_and_a_second_run_changes_nothing(deployed):
    first, (output, second) = deployed[1], deployed[2]
    assert first['changed'] > 0
    assert second['changed'] == 0, output


def test_the_engine_on_the_node_is_one_archive_of_the_engine_package(deployed):
    node = deployed[0]
    assert os.listdir(os.path.dirname(node.engine_archive)) == ['guestvault-engine.pyz']
    assert os.stat(node.engine_archive).st_mode & 0o777 == 0o644
    with zipfile.ZipFile(node.engine_archive) as archive:
        names = archive.namelist()
        assert archive.testzip() is None
    sources = sorted('guestvault_engine/' + str(path.relative_to(ENGINE_SOURCE))
                     for path in ENGINE_SOURCE.rglob('*.py') if '__pycache__' not in path.parts)
    assert names == ['__main__.py'] + sources
    assert {'guestvault_engine/__init__.py', 'guestvault_engine/run/node_command.py',
            'guestvault_engine/guest/registry.py', 'guestvault_engine/policy/calendar.py'} <= set(names)


def test_the_installed_command_runs_from_the_engine_archive(deployed):
    node = deployed[0]
    assert os.stat(node.command).st_mode & 0o777 == 0o755
    launcher = open(node.command).read()
    assert launcher.startswith(f'#!{PYTHON}\n')
    assert f'\nARCHIVE = "{node.engine_archive}"\n' in launcher
    assert '/usr/lib/guestvault/' not in launcher.replace(node.engine_archive, '')
    env = {k: v for k, v in os.environ.items() if k != 'GUESTVAULT_ENGINE'}
    # The launcher's own lookup, asked where the node command comes from: the archive.
    proc = subprocess.run([PYTHON, '-c', 'import runpy, sys; '
                           'print(runpy.run_path(sys.argv[1])["load_engine"]().__file__)',
                           node.command], cwd='/', env=env, capture_output=True, text=True,
                          check=False)
    assert proc.stdout.strip() == os.path.join(node.engine_archive, 'guestvault_engine', 'run',
                                               'node_command.py'), proc.stderr
    # Run from elsewhere by its path, as a timer's service does: no source tree nearby.
    proc = subprocess.run([node.command, '--help'], cwd='/', env=env, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0 and 'usage: guestvault-dump' in proc.stdout, proc.stderr
    # The archive's engine reads the deployed configuration.
    proc = subprocess.run([node.command, '--job', 'nosuchjob', '--config-dir', node.config_dir],
                          cwd='/', env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and 'jobs: here, weeknights' in proc.stderr, proc.stderr
    proc = subprocess.run([node.command, '--job', 'elsewhere', '--config-dir', node.config_dir],
                          cwd='/', env=env, capture_output=True, text=True, check=False)
    assert "no job 'elsewhere'" in proc.stderr
    # guestvault-pct is the same launcher under its own name: pct's restore, from the archive.
    pct = os.path.join(node.sbin_dir, 'guestvault-pct')
    proc = subprocess.run([pct, 'restore', '--help'], cwd='/', env=env, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0 and 'usage: guestvault-pct restore' in proc.stdout, proc.stderr
    proc = subprocess.run([pct, 'restore', '300', '/nonexistent.tar.zst', '--config-dir',
                           node.config_dir], cwd='/', env=env, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 2 and 'there is no archive /nonexistent.tar.zst' in proc.stderr
    # The archive runs as a zipapp too, with any interpreter.
    proc = subprocess.run([sys.executable, node.engine_archive, '--help'], cwd='/', env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and 'usage: guestvault-dump' in proc.stdout, proc.stderr


def test_a_job_runs_from_the_engine_archive(node, make_guest, store):
    guest = make_guest(vmid=9102)
    converged(node, guestvault_guests=[{'vmid': 9102, 'qmp': guest.qmp_socket}],
              guestvault_jobs=[{'id': 'now', 'schedule': 'daily', 'vmid': [9102],
                                'storage': 'backup'}])
    env = {k: v for k, v in os.environ.items() if k != 'GUESTVAULT_ENGINE'}
    env['GUESTVAULT_STATE_DIR'] = os.path.join(node.base, 'state')
    proc = subprocess.run([node.command, '--job', 'now', '--config-dir', node.config_dir],
                          cwd='/', env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len([b for b in os.listdir(os.path.join(node.base, 'backup', 'vm', '9102'))
                if b[0] != '.']) == 1


def test_the_engine_archive_has_the_same_bytes_for_the_same_sources(tmp_path):
    """What makes the role's copy idempotent: file times, build directory and caches do not matter."""
    copy = tmp_path / 'engine'
    shutil.copytree(ENGINE_SOURCE, copy, ignore=shutil.ignore_patterns('__pycache__'))
    (copy / 'run' / '__pycache__').mkdir()
    (copy / 'run' / '__pycache__' / 'job.cpython-311.pyc').write_bytes(b'stale')
    (copy / 'notes.txt').write_text('not engine code')
    for path in copy.rglob('*.py'):
        os.utime(path, (1234567890, 1234567890))
    archives = []
    for source, target in ((ENGINE_SOURCE, tmp_path / 'a.pyz'), (copy, tmp_path / 'b.pyz')):
        proc = subprocess.run([sys.executable, str(BUILD_ENGINE), str(source), str(target)],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0 and proc.stdout.strip() == str(target), proc.stderr
        archives.append(target.read_bytes())
    assert archives[0] == archives[1]
    proc = subprocess.run([sys.executable, str(BUILD_ENGINE), str(tmp_path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and 'is not the engine' in proc.stderr


def test_the_old_engine_directory_variable_is_refused_with_advice(node):
    rc, output, _recap = node.converge(roles=('node',),
                                       guestvault_engine_dir='/usr/lib/guestvault/guestvault_engine')
    assert rc != 0 and 'guestvault_engine_archive' in output, output
    assert not os.path.exists(node.engine_archive)


def test_the_registry_holds_the_inventorys_guests(deployed):
    node = deployed[0]
    web, mail, container = list_guests(node.config_dir)
    assert (web.vmid, web.name, web.qmp_socket, web.agent_socket, web.pool, web.tags,
            web.exclude) == (101, 'web01', '/run/qemu/101.qmp', '/run/qemu/101.qga',
                             'production', ('web', 'critical'), ('virtio2',))
    assert (mail.vmid, mail.start_command, mail.description) == (
        102, 'systemctl start qemu@102', 'Mail server.\nIts scratch disk is not backed up.')
    assert (container.type, container.lxc, container.lxcpath, container.included_volumes) == (
        'lxc', 'web', None, (('/var/www', '/srv/web-data'),))


def test_exclusive_registry_removes_guests_not_in_the_inventory(node):
    converged(node, roles=('node',), guestvault_guests=GUESTS, guestvault_jobs=[])
    stray = os.path.join(node.config_dir, 'guests.d', '999.conf')
    with open(stray, 'w') as handle:
        handle.write('qmp: /run/qemu/999.qmp\n')
    converged(node, roles=('node',), guestvault_guests=GUESTS, guestvault_jobs=[])
    assert os.path.exists(stray), 'without guestvault_registry_exclusive nothing is removed'
    converged(node, roles=('node',), guestvault_guests=GUESTS[:1], guestvault_jobs=[],
              guestvault_registry_exclusive=True)
    assert [g.vmid for g in list_guests(node.config_dir)] == [101]


def test_jobs_cfg_and_timers_exist_as_declared_and_systemd_accepts_them(deployed):
    node = deployed[0]
    jobs = load_jobs(node.config_dir)
    assert sorted(jobs) == ['here', 'weeknights']
    assert jobs['weeknights'].options['schedule'] == 'mon..fri 23:00'
    assert jobs['weeknights'].options['repeat-missed'] is True
    assert jobs['here'].options['node'] == [socket.gethostname()]
    assert node.units() == ['guestvault-job-here.service', 'guestvault-job-here.timer',
                            'guestvault-job-weeknights.service',
                            'guestvault-job-weeknights.timer']
    timer = open(os.path.join(node.unit_dir, 'guestvault-job-weeknights.timer')).read()
    assert 'OnCalendar=Mon..Fri *-*-* 23:00:00' in timer and 'Persistent=true' in timer
    service = open(os.path.join(node.unit_dir, 'guestvault-job-weeknights.service')).read()
    assert f'ExecStart={node.command} --job weeknights --config-dir {node.config_dir}' in service
    if shutil.which('systemd-analyze') is None:
        pytest.skip('needs systemd-analyze')
    units = [os.path.join(node.unit_dir, u) for u in node.units()]
    proc = subprocess.run(['systemd-analyze', 'verify', *units], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr


def test_a_job_meant_for_another_node_is_not_deployed_and_leaves_when_moved(node):
    converged(node, roles=SCHEDULE_ROLES, guestvault_jobs=JOBS)
    assert 'elsewhere' not in load_jobs(node.config_dir)
    assert not [u for u in node.units() if 'elsewhere' in u]
    moved = [dict(job, node=['othernode']) if job['id'] == 'here' else job for job in JOBS]
    converged(node, roles=SCHEDULE_ROLES, guestvault_jobs=moved)
    assert sorted(load_jobs(node.config_dir)) == ['weeknights']
    assert not [u for u in node.units() if 'here' in u]


def test_exclusive_jobs_removes_jobs_not_declared(node):
    converged(node, roles=SCHEDULE_ROLES, guestvault_jobs=JOBS)
    apply_job('handmade', {'schedule': 'daily', 'all': True, 'storage': 'backup'},
              config_dir=node.config_dir, unit_dir=node.unit_dir, command=node.command,
              manage_systemd=False)
    converged(node, roles=SCHEDULE_ROLES, guestvault_jobs=JOBS)
    assert 'handmade' in load_jobs(node.config_dir)
    converged(node, roles=SCHEDULE_ROLES, guestvault_jobs=JOBS,
              guestvault_jobs_exclusive=True)
    assert sorted(load_jobs(node.config_dir)) == ['here', 'weeknights']
    assert not [u for u in node.units() if 'handmade' in u]


def test_the_default_policy_is_weeknights_at_23_and_sundays_at_01(node):
    converged(node, roles=SCHEDULE_ROLES, guestvault_backup_storage='backup-nfs')
    jobs = load_jobs(node.config_dir)
    assert {job_id: job.options['schedule'] for job_id, job in jobs.items()} == {
        'weeknights': 'mon..fri 23:00', 'sundays': 'sun 01:00'}
    for job in jobs.values():
        assert job.options['all'] is True and job.options['storage'] == 'backup-nfs'
        assert job.options['prune-backups'] == {'keep-daily': 3, 'keep-weekly': 2,
                                                'keep-monthly': 1}
    timers = {u: open(os.path.join(node.unit_dir, u)).read() for u in node.units()
              if u.endswith('.timer')}
    assert 'OnCalendar=Mon..Fri *-*-* 23:00:00' in timers['guestvault-job-weeknights.timer']
    assert 'OnCalendar=Sun *-*-* 01:00:00' in timers['guestvault-job-sundays.timer']


def test_check_mode_on_a_fresh_node_reports_changes_and_writes_no_configuration(node):
    rc, output, recap = node.converge(check=True, guestvault_guests=GUESTS, guestvault_jobs=JOBS)
    assert rc == 0 and recap['changed'] > 0, output
    assert not os.path.exists(node.config_dir) and node.units() == []
    assert not os.path.exists(node.engine_archive)
    assert os.listdir(node.controller_tmp) == []


def test_site_playbook_deploys_a_whole_node_and_a_second_run_changes_nothing(node):
    rc, output, first = node.converge(playbook='site.yml', guestvault_guests=GUESTS,
                                      guestvault_jobs=JOBS)
    assert rc == 0 and first['changed'] > 0, output
    for name in ('vzdump.conf', 'storage.cfg', 'jobs.cfg', 'guests.d/101.conf'):
        assert os.path.isfile(os.path.join(node.config_dir, name)), name
    rc, output, second = node.converge(playbook='site.yml', guestvault_guests=GUESTS,
                                       guestvault_jobs=JOBS)
    assert rc == 0 and second['changed'] == 0, output


def test_backup_now_honours_max_age_and_restore_writes_the_images(node, make_guest, store):
    guest = make_guest(vmid=9101)
    os.makedirs(os.path.join(node.config_dir, 'guests.d'))
    with open(os.path.join(node.config_dir, 'guests.d', '9101.conf'), 'w') as handle:
        handle.write(f'qmp: {guest.qmp_socket}\n')
    for changed in (1, 0):   # the second run finds a backup younger than max_age
        rc, output, recap = node.converge(playbook='backup_now.yml', vmids=[9101], dumpdir=store,
                                          max_age='1h')
        assert rc == 0 and recap['changed'] == changed, output
    assert len([b for b in os.listdir(os.path.join(store, 'vm', '9101')) if b[0] != '.']) == 1
    target = os.path.join(node.base, 'restored')
    rc, output, recap = node.converge(playbook='restore.yml', vmid=9101, dumpdir=store,
                                      target_dir=target)
    assert rc == 0 and recap['changed'] == 1, output
    assert sorted(os.listdir(target)) == ['guest.json', 'vd0.qcow2']


# ----------------------------------------------------------------------------- guest_registry

def test_guest_registry_writes_an_entry_that_loads_and_a_second_run_changes_nothing(
        ansible, config_dir):
    args = {'vmid': 105, 'name': 'mail', 'qmp': '/run/qemu/105.qmp', 'tags': ['mail'],
            'include': ['virtio0'], 'config_dir': config_dir}
    planned = ansible.module('guestvault.backup.guest_registry', args, check=True, diff=True)
    assert planned['changed'] is True and 'qmp: /run/qemu/105.qmp' in planned['diff']['after']
    assert not os.path.exists(planned['path'])
    first = ansible.module('guestvault.backup.guest_registry', args)
    assert first['changed'] is True and first['entry']['include'] == ['virtio0']
    entry = load_guest(config_dir, 105)
    assert (entry.name, entry.qmp_socket, entry.tags, entry.include) == (
        'mail', '/run/qemu/105.qmp', ('mail',), ('virtio0',))
    assert ansible.module('guestvault.backup.guest_registry', args)['changed'] is False
    changed = ansible.module('guestvault.backup.guest_registry', dict(args, pool='prod'),
                             diff=True)
    assert changed['changed'] and 'pool: prod' in changed['diff']['after']
    assert 'pool' not in changed['diff']['before']
    gone = ansible.module('guestvault.backup.guest_registry',
                          {'vmid': 105, 'state': 'absent', 'config_dir': config_dir})
    assert gone['changed'] and not os.path.exists(first['path'])
    assert ansible.module('guestvault.backup.guest_registry',
                          {'vmid': 105, 'state': 'absent', 'config_dir': config_dir}
                          )['changed'] is False


def test_guest_registry_registers_a_container(ansible, config_dir):
    args = {'vmid': 300, 'type': 'lxc', 'lxc': 'web', 'lxcpath': '/srv/lxc',
            'mountpoints': {'mp1': '/srv/logs,mp=/var/log/app',
                            'mp0': '/srv/web-data,mp=/var/www,backup=1'},
            'config_dir': config_dir}
    first = ansible.module('guestvault.backup.guest_registry', args)
    assert first['changed'] is True
    assert first['entry']['mountpoints'] == {'mp0': '/srv/web-data,mp=/var/www,backup=1',
                                             'mp1': '/srv/logs,mp=/var/log/app'}
    entry = load_guest(config_dir, 300)
    assert (entry.type, entry.lxc, entry.lxcpath, entry.qmp_socket) == (
        'lxc', 'web', '/srv/lxc', '')
    assert entry.included_volumes == (('/var/www', '/srv/web-data'),)
    assert ansible.module('guestvault.backup.guest_registry', args)['changed'] is False


def test_guest_registry_leaves_a_handwritten_entry_with_the_same_meaning_alone(
        ansible, config_dir):
    path = os.path.join(config_dir, 'guests.d', '106.conf')
    with open(path, 'w') as handle:
        handle.write('# written by hand\nqmp:   /run/qemu/106.qmp\nname: db\n')
    result = ansible.module('guestvault.backup.guest_registry',
                            {'vmid': 106, 'name': 'db', 'qmp': '/run/qemu/106.qmp',
                             'config_dir': config_dir})
    assert result['changed'] is False and '# written by hand' in open(path).read()


@pytest.mark.parametrize('args, words', [
    ({'vmid': 107, 'qmp': 'run/qemu/107.qmp'}, ('not an absolute path',)),
    ({'vmid': 107, 'qmp': '/run/q.qmp', 'pool': 'bad pool'}, ('not a valid pool name',)),
    ({'vmid': 107, 'qmp': '/run/q.qmp', 'tags': ['ok', 'no way']}, ('tags',)),
    ({'vmid': 99, 'qmp': '/run/q.qmp'}, ('not a valid vmid',)),
    ({'vmid': 107, 'qmp': '/run/q.qmp', 'name': 'two\nlines'}, ('one line',)),
    ({'vmid': 107}, ("no 'qmp' line",)),
    ({'vmid': 107, 'type': 'lxc'}, ('type is lxc', 'lxc')),
    ({'vmid': 107, 'type': 'lxc', 'lxc': 'web', 'mountpoints': {'mp0': '/srv'}},
     ('mountpoints mp0', 'no mp=<path in the container>')),
    ({'vmid': 107, 'lxc': 'web'}, ("lxc only apply to LXC containers; add 'type: lxc'",)),
])
def test_guest_registry_refuses_bad_entries_and_writes_nothing(ansible, config_dir, args, words):
    result = ansible.module('guestvault.backup.guest_registry', dict(args, config_dir=config_dir))
    assert_failed_with(result, *words)
    assert os.listdir(os.path.join(config_dir, 'guests.d')) == []


# ----------------------------------------------------------------------------- schedule_info

def test_schedule_info_lists_the_next_runs_and_the_systemd_translation(ansible):
    result = ansible.module('guestvault.backup.schedule_info', {
        'schedule': 'mon..fri 23:00', 'start_time': '2026-11-20T12:00:00Z', 'iterations': 3,
        'timezone': 'Europe/Berlin'})
    assert result['changed'] is False
    assert result['events'] == ['2026-11-20T23:00:00+01:00', '2026-11-23T23:00:00+01:00',
                                '2026-11-24T23:00:00+01:00']
    assert result['systemd_oncalendar'] == ['Mon..Fri *-*-* 23:00:00 Europe/Berlin']
    assert not result.get('warnings')
    epoch = ansible.module('guestvault.backup.schedule_info', {
        'schedule': 'sun 01:00 UTC', 'start_time': '1763683200', 'iterations': 1})
    assert epoch['events'] == ['2025-11-23T01:00:00+00:00']


def test_schedule_info_warns_about_the_proxmox_minute_trap(ansible):
    result = ansible.module('guestvault.backup.schedule_info', {
        'schedule': 'mon..fri 23', 'start_time': '2026-11-20T12:00:00Z', 'iterations': 2,
        'timezone': 'UTC'})
    assert result['events'] == ['2026-11-20T12:23:00+00:00', '2026-11-20T13:23:00+00:00']
    assert any('minute 23' in w and 'mon..fri 23:00' in w for w in result['warnings'])


def test_schedule_info_refuses_a_bad_schedule(ansible):
    assert_failed_with(ansible.module('guestvault.backup.schedule_info',
                                      {'schedule': 'mon..fri 25:00'}), '25')


def test_the_node_role_builds_the_file_restore_appliance_once(node, tmp_path):
    """guestvault_file_restore_appliance: the image is built on the node at converge time (so
    a file restore needs no Debian mirror later), and a second converge finds it."""
    cache = str(tmp_path / 'appliance')
    output, recap = converged(node, roles=('node',), guestvault_jobs=[],
                              guestvault_file_restore_appliance=True,
                              guestvault_appliance_cache=cache)
    builds = [name for name in os.listdir(cache) if re.fullmatch(r'[0-9a-f]{16}', name)]
    assert len(builds) == 1, os.listdir(cache)
    for name in ('vmlinux', 'initrd.gz', 'manifest.json'):
        assert os.path.getsize(os.path.join(cache, builds[0], name)) > 0
    assert "Build file_restore's appliance image" in output
    _output, again = converged(node, roles=('node',), guestvault_jobs=[],
                               guestvault_file_restore_appliance=True,
                               guestvault_appliance_cache=cache)
    assert again['changed'] == 0 and recap['changed'] > again['changed']
