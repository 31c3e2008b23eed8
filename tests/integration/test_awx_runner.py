"""A playbook run the way AWX runs it: ansible-runner's transmit | worker | process stream."""
import os
import subprocess
import sys

import pytest
import yaml

from lab_checks import backups_in
from procs import kill_tree, run_bounded

BIN = os.path.dirname(sys.executable)
RUNNER = os.path.join(BIN, 'ansible-runner')
COLLECTIONS = os.path.join(os.path.dirname(__file__), '..', '..', '.build', 'collections')

pytestmark = pytest.mark.skipif(not os.path.exists(RUNNER), reason='needs ansible-runner')


def test_a_scheduled_template_backs_up_and_prunes_through_ansible_runner(
        make_guest, store, tmp_path, installed_collection):
    guest = make_guest(vmid=9201)
    data = tmp_path / 'runner'
    (data / 'project').mkdir(parents=True)
    (data / 'inventory').mkdir()
    (data / 'env').mkdir()
    play = [{'hosts': 'all', 'gather_facts': False, 'tasks': [
        {'name': 'nightly backup', 'guestvault.backup.guest_backup': {
            'vmid': guest.vmid, 'qmp_socket': guest.qmp_socket, 'dumpdir': store}},
        {'name': 'retention', 'guestvault.backup.prune': {
            'vmid': guest.vmid, 'dumpdir': store, 'keep_last': 1}},
    ]}]
    (data / 'project' / 'backup.yml').write_text(yaml.safe_dump(play, sort_keys=False))
    (data / 'inventory' / 'hosts').write_text(
        f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n")
    (data / 'env' / 'envvars').write_text(yaml.safe_dump({
        'ANSIBLE_COLLECTIONS_PATH': os.path.realpath(COLLECTIONS),
        'GUESTVAULT_RUN_DIR': os.environ.get('GUESTVAULT_RUN_DIR', '')}))
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    outputs = []
    for _run in range(2):
        # AWX: the control node transmits, an execution node works, the controller processes.
        # The worker runs ansible-playbook in a session of its own: on a timeout (a run took
        # ~8 s on a busy day here) or a failure, every stage's whole tree is killed.
        transmit = subprocess.Popen([RUNNER, 'transmit', str(data), '-p', 'backup.yml'],
                                    stdout=subprocess.PIPE, env=env, start_new_session=True)
        worker = subprocess.Popen([RUNNER, 'worker'], stdin=transmit.stdout,
                                  stdout=subprocess.PIPE, env=env, start_new_session=True)
        transmit.stdout.close()
        try:
            process = run_bounded([RUNNER, 'process', str(data)], 300, stdin=worker.stdout,
                                  capture_output=True, text=True, env=env)
            worker.wait(30)
            transmit.wait(30)
        finally:
            worker.stdout.close()
            for stage in (worker, transmit):
                if stage.poll() is None:
                    kill_tree(stage.pid)
                    stage.wait()
        assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
        outputs.append(process.stdout)
    # Both runs backed up; the second one's retention removed the first backup.
    for output in outputs:
        assert 'TASK [nightly backup]' in output and 'failed=0' in output
        assert output.split('TASK [nightly backup]')[1].split('TASK')[0].count('changed:') == 1
    assert 'changed: [localhost]' in outputs[1].split('TASK [retention]')[1]
    assert len(backups_in(store, guest.vmid)) == 1
