"""DirectFiles: whole files written with O_DIRECT, exact in content and length, hidden until
renamed; where O_DIRECT is refused, the page cache path."""
import errno
import os

import pytest

from guestvault_engine.storage import files
from guestvault_engine.storage.files import DIRECT_ALIGNMENT, DirectFiles


def takes_o_direct(folder):
    try:
        fd = os.open(os.path.join(folder, '.probe'), os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    os.unlink(os.path.join(folder, '.probe'))
    return True


@pytest.mark.parametrize('length', [0, 1, DIRECT_ALIGNMENT - 1, DIRECT_ALIGNMENT,
                                    4 * 1024 * 1024 + 28])
def test_files_have_their_exact_content_and_length(tmp_path, length):
    writer = DirectFiles()
    data = os.urandom(length)
    writer.write_hidden(str(tmp_path / 'f'), data, durable=False)
    assert (tmp_path / 'f').read_bytes() == data
    assert bytes(writer.read_view(str(tmp_path / 'f'))) == data
    assert os.listdir(tmp_path) == ['f']            # no temporary file left behind
    assert writer.direct == takes_o_direct(tmp_path)   # the O_DIRECT path where it exists


def test_one_scratch_buffer_serves_files_of_any_length_in_any_order(tmp_path):
    writer = DirectFiles()
    blobs = [os.urandom(n) for n in (5000, 3 * DIRECT_ALIGNMENT + 7, 100, 9000)]
    for number, blob in enumerate(blobs):
        writer.write_hidden(str(tmp_path / str(number)), blob, durable=number % 2 == 0)
    for number, blob in enumerate(blobs):
        assert (tmp_path / str(number)).read_bytes() == blob   # no padding or old bytes
    for number, blob in reversed(list(enumerate(blobs))):
        assert writer.read_view(str(tmp_path / str(number))) == blob


def test_a_file_system_refusing_o_direct_gets_page_cache_writes(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, 'Invalid argument')
        return real_open(path, flags, *args)

    monkeypatch.setattr(files.os, 'open', no_direct)
    writer = DirectFiles()
    writer.write_hidden(str(tmp_path / 'a'), b'chunk', durable=True)
    assert not writer.direct
    writer.write_hidden(str(tmp_path / 'b'), b'more', durable=False)
    assert (tmp_path / 'a').read_bytes() == b'chunk' and (tmp_path / 'b').read_bytes() == b'more'
    assert writer.read_view(str(tmp_path / 'a')) == b'chunk'
    assert sorted(os.listdir(tmp_path)) == ['a', 'b']


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(files.os, 'pwrite', full)
    with pytest.raises(OSError) as caught:
        DirectFiles().write_hidden(str(tmp_path / 'f'), b'x' * 10000, durable=False)
    assert caught.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


def test_a_refused_o_direct_open_that_created_the_file_leaves_no_temporary(tmp_path, monkeypatch):
    real_open = os.open

    def create_then_refuse(path, flags, *args):    # what Linux does on such file systems
        if flags & os.O_DIRECT:
            os.close(real_open(path, flags & ~os.O_DIRECT, *args))
            raise OSError(errno.EINVAL, 'Invalid argument')
        return real_open(path, flags, *args)

    monkeypatch.setattr(files.os, 'open', create_then_refuse)
    writer = DirectFiles()
    writer.write_hidden(str(tmp_path / 'chunk'), b'data' * 1000, durable=False)
    assert not writer.direct
    assert os.listdir(tmp_path) == ['chunk']
    assert (tmp_path / 'chunk').read_bytes() == b'data' * 1000
