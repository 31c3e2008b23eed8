"""Real QEMU guests for integration tests (see tools/labguest.py)."""
import shutil

import pytest

pytest.register_assert_rewrite('ansible_runner')

from ansible_runner import COLLECTIONS, INSTALLED, Ansible, stale_collection_files, write_callback  # noqa: E402
from labguest import LabGuest  # noqa: E402
from lab_checks import datastore_directory  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which('qemu-system-x86_64') is None,
                                reason='needs qemu-system-x86_64 (make deps)')


@pytest.fixture(autouse=True)
def private_run_dir(tmp_path, monkeypatch):
    """Node locks of each test in its own directory, so tests never see each other's locks."""
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    monkeypatch.setenv('GUESTVAULT_RUN_DIR', str(run_dir))
    return run_dir


@pytest.fixture
def make_guest(tmp_path):
    """Start lab guests: make_guest(disks=[('qcow2', '64M')], vmid=...); all stopped at the end."""
    started = []

    def start(disks=(('qcow2', '64M'),), vmid=9001, name=None, **kwargs):
        workdir = tmp_path / f'guest{len(started)}'
        guest = LabGuest(str(workdir), disks=list(disks), vmid=vmid,
                         name=name or f'lab{vmid}', **kwargs).start()
        started.append(guest)
        return guest

    yield start
    for guest in started:
        try:
            guest.stop()
        except Exception:
            pass


@pytest.fixture(scope='session')
def image():
    """The real Linux test guest (tools/linuxguest.py), built once per key and cached in
    .build/linuxguest/ (a cold build downloads ~80 MB of Debian packages)."""
    from linuxguest import build_image
    return build_image()


@pytest.fixture
def linux_guest(image, tmp_path):
    """Boot Linux guests: linux_guest(**LinuxGuest options), ready and answering on their agent
    when it returns; every one is stopped at the end."""
    from linuxguest import LinuxGuest
    started = []

    def start(**options):
        options.setdefault('vmid', 9101 + len(started))
        guest = LinuxGuest(str(tmp_path / f'linux{len(started)}'), image, **options)
        started.append(guest)
        return guest.start().wait_ready(300)

    yield start
    for guest in started:
        guest.stop()


@pytest.fixture
def store(tmp_path):
    path = tmp_path / 'store'
    path.mkdir()
    return str(path)


@pytest.fixture
def datastore_path(tmp_path):
    """An empty directory for a datastore (on a tmpfs where one mounts: see lab_checks)."""
    with datastore_directory(tmp_path / 'datastore') as path:
        yield path


@pytest.fixture
def config_dir(tmp_path):
    path = tmp_path / 'etc'
    (path / 'guests.d').mkdir(parents=True)
    return str(path)


# ----------------------------------------------------------------------------- running ansible

@pytest.fixture(scope='session')
def callback_dir(tmp_path_factory):
    """The JSON-lines stdout callback through which ``Ansible`` reads task results."""
    return write_callback(tmp_path_factory.mktemp('ansible-callbacks'))


@pytest.fixture(scope='session')
def installed_collection():
    """The tests run the shipped files: refuse an install that differs from the source tree."""
    stale = stale_collection_files()
    if stale is None:
        pytest.fail(f"guestvault.backup is not installed in {COLLECTIONS}; run 'make collection'")
    if stale:
        pytest.fail(f"the collection in {COLLECTIONS} is older than the source "
                    f"({', '.join(stale)}); run 'make collection'")
    return INSTALLED


@pytest.fixture
def ansible(tmp_path, callback_dir, installed_collection):
    """Runs modules as users do: ``ansible.module(name, args)``, ``ansible.playbook(tasks)``."""
    workdir = tmp_path / 'ansible'
    workdir.mkdir()
    return Ansible(str(workdir), callback_dir)
