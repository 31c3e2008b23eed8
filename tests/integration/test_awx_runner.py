"""A playbook run the way AWX runs it: ansible-runner's transmit | worker | process stream."""
import os
import subprocess
import sys

import pytest
import yaml

from lab_checks import backups_in

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
        transmit = subprocess.Popen([RUNNER, 'transmit', str(data), '-p', 'backup.yml'],
                                    stdout=subprocess.PIPE, env=env)
        worker = subprocess.Popen([RUNNER, 'worker'], stdin=transmit.stdout,
                                  stdout=subprocess.PIPE, env=env)
        transmit.stdout.close()
        process = subprocess.run([RUNNER, 'process', str(data)], stdin=worker.stdout,
                                 capture_output=True, text=True, env=env, timeout=300,
                                 check=False)
        worker.wait(30)
        transmit.wait(30)
        assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
        outputs.append(process.stdout)
    # Both runs backed up; the second one's retention removed the first backup.
    for output in outputs:
        assert 'TASK [nightly backup]' in output and 'failed=0' in output
        assert output.split('TASK [nightly backup]')[1].split('TASK')[0].count('changed:') == 1
    assert 'changed: [localhost]' in outputs[1].split('TASK [retention]')[1]
    assert len(backups_in(store, guest.vmid)) == 1
