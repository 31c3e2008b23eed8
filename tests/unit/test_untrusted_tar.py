"""restore/untrusted_tar: a tar stream made from a guest's filesystem never writes outside its
directory, and what it may write comes out whole; file_restore's own input checks."""
import io
import os
import stat
import tarfile

import pytest

from guestvault_engine.errors import ConfigError, StorageError
from guestvault_engine.restore import untrusted_tar
from guestvault_engine.run.file_restore import (FileRestoreRequest, normalize_path, parse_size,
                                                run_file_restore)


def make_tar(path, members):
    """members: (TarInfo fields, data) with data None for non-files, or a stream's bytes; then
    zeroes, as on the appliance's output disk. Returns the stream's length."""
    if isinstance(members, bytes):
        path.write_bytes(members + b'\0' * 65536)
        return len(members)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w', format=tarfile.GNU_FORMAT) as tar:
        for fields, data in members:
            info = tarfile.TarInfo(fields.pop('name'))
            for key, value in fields.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    stream = buffer.getvalue()
    with open(path, 'wb') as handle:
        handle.write(stream + b'\0' * 65536)
    return len(stream)


def extract(tmp_path, members, **limits):
    length = make_tar(tmp_path / 'in.tar', members)
    staging = tmp_path / 'staging'
    staging.mkdir()
    with open(tmp_path / 'in.tar', 'rb') as raw:
        return untrusted_tar.extract(untrusted_tar.Bounded(raw, length), str(staging),
                                     **limits), staging


def test_files_directories_links_and_times_come_out_as_the_guest_had_them(tmp_path):
    counts, staging = extract(tmp_path, [
        ({'name': './etc', 'type': tarfile.DIRTYPE, 'mode': 0o755, 'mtime': 1000}, None),
        ({'name': './etc/hosts', 'mode': 0o644, 'mtime': 2000}, b'127.0.0.1 localhost\n'),
        ({'name': './etc/localtime', 'type': tarfile.SYMTYPE, 'linkname': '/usr/share/zoneinfo/UTC'}, None),
        ({'name': './etc/hosts.bak', 'type': tarfile.LNKTYPE, 'linkname': './etc/hosts'}, None),
        ({'name': './var/lib/deep/file', 'mode': 0o600}, b'x' * 70000),   # parents implied
    ])
    assert (staging / 'etc' / 'hosts').read_bytes() == b'127.0.0.1 localhost\n'
    assert os.stat(staging / 'etc' / 'hosts').st_mtime == 2000
    assert os.stat(staging / 'etc').st_mtime == 1000
    assert os.readlink(staging / 'etc' / 'localtime') == '/usr/share/zoneinfo/UTC'
    assert os.stat(staging / 'etc' / 'hosts.bak').st_ino == os.stat(staging / 'etc' / 'hosts').st_ino
    assert (staging / 'var' / 'lib' / 'deep' / 'file').stat().st_size == 70000
    assert counts == {'files': 3, 'bytes': 20 + 70000, 'directories': 1, 'links': 1,
                      'not_extracted': []}


@pytest.mark.parametrize('name', ['/etc/passwd', '../outside', './a/../../outside'])
def test_a_name_that_escapes_is_refused(tmp_path, name):
    with pytest.raises(untrusted_tar.UnsafeMember, match='escapes'):
        extract(tmp_path, [({'name': name}, b'evil')])
    assert not (tmp_path / 'outside').exists()


def test_nothing_is_written_through_a_link_the_backup_holds(tmp_path):
    (tmp_path / 'victim').mkdir()
    with pytest.raises(untrusted_tar.UnsafeMember, match='behind a symbolic link'):
        extract(tmp_path, [
            ({'name': './etc', 'type': tarfile.SYMTYPE, 'linkname': str(tmp_path / 'victim')}, None),
            ({'name': './etc/passwd'}, b'evil'),
        ])
    assert os.listdir(tmp_path / 'victim') == []


def test_a_hard_link_must_name_a_file_extracted_before_it(tmp_path):
    secret = tmp_path / 'secret'
    secret.write_bytes(b'host secret')
    with pytest.raises(untrusted_tar.UnsafeMember, match='escapes'):
        extract(tmp_path, [({'name': './copy', 'type': tarfile.LNKTYPE,
                             'linkname': '../secret'}, None)])
    second = tmp_path / 'second'
    second.mkdir()
    with pytest.raises(untrusted_tar.UnsafeMember, match='hard link'):
        extract(second, [
            ({'name': './link', 'type': tarfile.SYMTYPE, 'linkname': str(secret)}, None),
            ({'name': './copy', 'type': tarfile.LNKTYPE, 'linkname': './link'}, None),
        ])


def test_devices_and_fifos_are_skipped_and_special_bits_dropped(tmp_path):
    counts, staging = extract(tmp_path, [
        ({'name': './dev/sda', 'type': tarfile.BLKTYPE, 'devmajor': 8, 'devminor': 0}, None),
        ({'name': './run/fifo', 'type': tarfile.FIFOTYPE}, None),
        ({'name': './usr/bin/su', 'mode': 0o4777}, b'#!/bin/sh\n'),
    ])
    assert counts['not_extracted'] == ['dev/sda', 'run/fifo']
    assert not (staging / 'dev' / 'sda').exists() and not (staging / 'run' / 'fifo').exists()
    assert stat.S_IMODE((staging / 'usr' / 'bin' / 'su').stat().st_mode) == 0o755


def test_a_stream_cut_short_is_an_error_not_a_short_file(tmp_path):
    make_tar(tmp_path / 'in.tar', [({'name': './a'}, b'a' * 1000)])
    staging = tmp_path / 'staging'
    staging.mkdir()
    with open(tmp_path / 'in.tar', 'rb') as raw, \
            pytest.raises(untrusted_tar.UnsafeMember, match='unreadable'):
        untrusted_tar.extract(untrusted_tar.Bounded(raw, 512 + 600), str(staging))
    assert os.listdir(staging) == []


def test_merge_renames_new_entries_merges_directories_and_reports_conflicts(tmp_path):
    staging, dest = tmp_path / 'staging', tmp_path / 'dest'
    (staging / 'etc').mkdir(parents=True)
    (staging / 'etc' / 'hosts').write_text('new')
    (staging / 'root.txt').write_text('top')
    (dest / 'etc').mkdir(parents=True)
    (dest / 'etc' / 'fstab').write_text('kept')
    (dest / 'etc' / 'hosts').write_text('old')
    assert untrusted_tar.conflicts(str(staging), str(dest)) == [str(dest / 'etc' / 'hosts')]
    untrusted_tar.merge(str(staging), str(dest))
    assert (dest / 'etc' / 'hosts').read_text() == 'new'
    assert (dest / 'etc' / 'fstab').read_text() == 'kept'
    assert (dest / 'root.txt').read_text() == 'top'


@pytest.mark.parametrize('text, size', [('4G', 4 << 30), ('512M', 512 << 20), ('1TiB', 1 << 40),
                                        ('100', 100), (2048, 2048), (' 8 k ', 8192)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize('text', ['', 'lots', '4X', '-1', '0', '1.5G'])
def test_a_malformed_size_is_refused_with_an_example(text):
    with pytest.raises(ConfigError, match='max_size'):
        parse_size(text)


def test_paths_are_taken_from_the_filesystem_root():
    assert normalize_path('/etc//nginx/./sites/') == 'etc/nginx/sites'
    assert normalize_path('/') == '' and normalize_path('etc') == 'etc'
    for bad in ('/etc/../../x', 'a\nb', 'a\0b'):
        with pytest.raises(ConfigError):
            normalize_path(bad)


@pytest.mark.parametrize('options, words', [
    ({'timeout': -1}, 'timeout -1 is not a number of seconds larger than 0'),
    ({'timeout': 0}, 'timeout 0 is not'), ({'timeout': float('nan')}, 'timeout nan is not'),
    ({'lockwait': -5}, 'lockwait -5 is not a number of minutes of 0 or more'),
    ({'paths': ['']}, 'a path is empty'), ({'paths': ['/etc', '']}, 'a path is empty'),
    ({'paths': []}, 'path names nothing'),
    ({'backup': ''}, 'backup is empty'), ({'filesystem': ''}, 'filesystem is empty'),
    ({'dest': ''}, 'dest is empty; give the absolute directory'),
    ({'archive': ''}, 'archive is empty')])
def test_file_restore_refuses_bad_inputs_before_acting(tmp_path, monkeypatch, options, words):
    # issue 20: timeout=-1 was taken, paths='' was taken for /, dest='' made it a listing
    monkeypatch.setenv('GUESTVAULT_WORK_DIR', str(tmp_path / 'work'))
    (tmp_path / 'dump').mkdir()
    with pytest.raises(ConfigError, match=words):
        run_file_restore(FileRestoreRequest(vmid=101, config_dir=str(tmp_path / 'etc'),
                                            dumpdir=str(tmp_path / 'dump'), **options))
    assert sorted(os.listdir(tmp_path)) == ['dump'] and os.listdir(tmp_path / 'dump') == []


def test_the_stream_ends_after_its_last_member_and_two_zero_blocks(tmp_path):
    make_tar(tmp_path / 'in.tar', [({'name': './a'}, b'a' * 1000), ({'name': './b'}, b'')])
    # a: header + 1024 bytes of padded data; b: a header; then the two zero blocks
    assert untrusted_tar.stream_length(str(tmp_path / 'in.tar')) == 512 + 1024 + 512 + 1024
    (tmp_path / 'junk').write_bytes(b'\x01' * 4096)
    with pytest.raises(untrusted_tar.UnsafeMember, match='unreadable'):
        untrusted_tar.stream_length(str(tmp_path / 'junk'))


# Each known tar attack, in a hand-built stream: refused with a clear error, nothing outside
# the staging directory changed (a host directory with known mode, owner, times and content),
# nothing left in it.

@pytest.fixture
def host(tmp_path):
    """A host directory the stream names: mode 0751, owner 1234 (as root), mtime 12345."""
    directory = tmp_path / 'host'
    directory.mkdir()
    (directory / 'secret').write_bytes(b'host secret\n')
    for path, mode in ((directory / 'secret', 0o640), (directory, 0o751)):
        os.chmod(path, mode)
        if os.geteuid() == 0:
            os.chown(path, 1234, 1234)
        os.utime(path, (12345, 12345))
    return directory


def outside(tmp_path):
    """Everything outside the staging directory a stream could change."""
    found = {'names': sorted(set(os.listdir(tmp_path)) - {'staging', 'in.tar'})}
    for directory, _dirs, names in os.walk(tmp_path / 'host'):
        for path in [directory] + [os.path.join(directory, name) for name in names]:
            st = os.lstat(path)
            found[path] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_nlink,
                           open(path, 'rb').read() if stat.S_ISREG(st.st_mode) else None)
    return found


def refused(tmp_path, members, words):
    before = outside(tmp_path)
    with pytest.raises(untrusted_tar.UnsafeMember, match=words) as failure:
        extract(tmp_path, members)
    assert outside(tmp_path) == before
    assert os.listdir(tmp_path / 'staging') == []
    assert 'nothing was extracted' in str(failure.value)


DIR, FILE, LINK, HARD = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE


def test_a_directory_then_a_link_of_its_name_leaves_the_host_directory_alone(tmp_path, host):
    # issue 20: the last pass over directories chmod'ed, chown'ed and utime'd through the link
    refused(tmp_path, [
        ({'name': './a', 'type': DIR, 'mode': 0o777, 'uid': 4242, 'gid': 4242, 'mtime': 1}, None),
        ({'name': './a', 'type': LINK, 'linkname': str(host)}, None),
    ], r"'./a' twice, first as a directory, then as a symbolic link")


@pytest.mark.parametrize('target', ['absolute', '../host', './../host'])
def test_a_link_then_a_file_through_it(tmp_path, host, target):
    refused(tmp_path, [
        ({'name': './a', 'type': LINK, 'linkname': str(host) if target == 'absolute'
          else target}, None),
        ({'name': './a/secret', 'mode': 0o666}, b'evil'),
    ], r"'./a/secret' lies behind a symbolic link of the tar stream, 'a'")


@pytest.mark.parametrize('link', ['..', '../..', '.', '/'])
def test_a_link_to_a_parent_then_a_directory_through_it(tmp_path, host, link):
    refused(tmp_path, [
        ({'name': './up', 'type': LINK, 'linkname': link}, None),
        ({'name': './up/host', 'type': DIR, 'mode': 0o777, 'uid': 4242, 'mtime': 1}, None),
    ], r"'./up/host' lies behind a symbolic link")


@pytest.mark.parametrize('name', ['./a/./../../host/secret', 'a/b/../../../host/secret',
                                  'a/..//../host/secret', '/host/secret'])
def test_dot_dot_after_normalisation_is_refused(tmp_path, host, name):
    refused(tmp_path, [({'name': './a/b', 'type': DIR}, None), ({'name': name}, b'evil')],
            'escapes its directory')


def pax_member(name, path, data):
    """A PAX member whose ustar name is harmless and whose extended header says ``path``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w', format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.pax_headers = {'path': path}
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_long_names_are_checked_whole(tmp_path, host):
    # a GNU longname (over 100 bytes) whose end climbs out
    refused(tmp_path, [({'name': './' + 'a/' * 60 + '../' * 61 + 'host/secret'}, b'evil')],
            'escapes its directory')
    # a PAX path that is not the ustar name beside it
    (tmp_path / 'staging').rmdir()
    refused(tmp_path, pax_member('innocent', '../host/secret', b'evil'),
            "escapes its directory: '../host/secret'")


def test_a_long_name_inside_is_extracted(tmp_path):
    name = '/'.join(['d' * 200] * 3) + '/' + 'f' * 250
    _counts, staging = extract(tmp_path, [({'name': './' + name, 'mode': 0o644}, b'deep')])
    assert (staging / name).read_bytes() == b'deep'


@pytest.mark.parametrize('first, second', [
    ((FILE, b'x'), (DIR, None)), ((DIR, None), (FILE, b'x')), ((LINK, None), (DIR, None)),
    ((FILE, b'x'), (LINK, None)), ((LINK, None), (FILE, b'x')), ((DIR, None), (HARD, None))])
def test_a_name_repeated_with_another_type_is_refused(tmp_path, host, first, second):
    def member(kind, data):
        linkname = {LINK: str(host / 'secret'), HARD: './f'}.get(kind, '')
        return ({'name': './a', 'type': kind, 'linkname': linkname, 'mode': 0o777,
                 'uid': 4242, 'mtime': 1}, data)
    refused(tmp_path, [({'name': './f'}, b'file'), member(*first), member(*second)],
            r"'./a' twice, first as a")


def test_a_name_repeated_with_its_own_type_is_replaced_as_tar_does(tmp_path):
    _counts, staging = extract(tmp_path, [
        ({'name': './d/f', 'mode': 0o600}, b'first'),      # d implied, then given
        ({'name': './d', 'type': DIR, 'mode': 0o750, 'mtime': 3000}, None),
        ({'name': './d/f', 'mode': 0o644}, b'second'),
        ({'name': './d/l', 'type': LINK, 'linkname': 'f'}, None),
        ({'name': './d/l', 'type': LINK, 'linkname': 'g'}, None),
        ({'name': './d', 'type': DIR, 'mode': 0o755, 'mtime': 4000}, None),
    ])
    assert (staging / 'd' / 'f').read_bytes() == b'second'
    assert os.readlink(staging / 'd' / 'l') == 'g'
    assert stat.S_IMODE(os.stat(staging / 'd').st_mode) == 0o755
    assert os.stat(staging / 'd').st_mtime == 4000


@pytest.mark.parametrize('linkname, words', [
    ('../host/secret', 'escapes its directory'), ('/host/secret', 'escapes its directory'),
    ('./s', 'is not a file extracted before it'), ('./d/secret', 'lies behind a symbolic link'),
    ('./missing/x', 'is not a file extracted before it')])
def test_a_hard_link_to_outside_or_to_a_link_is_refused(tmp_path, host, linkname, words):
    refused(tmp_path, [
        ({'name': './s', 'type': LINK, 'linkname': str(host / 'secret')}, None),
        ({'name': './d', 'type': LINK, 'linkname': str(host)}, None),
        ({'name': './h', 'type': HARD, 'linkname': linkname}, None),
    ], words)


def test_more_file_data_than_allowed_is_refused_before_it_is_written(tmp_path):
    with pytest.raises(untrusted_tar.UnsafeMember, match='more than 1000 bytes of files'):
        extract(tmp_path, [({'name': './a'}, b'a' * 600), ({'name': './b'}, b'b' * 600)],
                max_bytes=1000)
    assert os.listdir(tmp_path / 'staging') == []


def test_only_an_empty_directory_is_extracted_into(tmp_path):
    (tmp_path / 'staging').mkdir()
    (tmp_path / 'staging' / 'mine').write_text('kept')
    make_tar(tmp_path / 'in.tar', [({'name': './a'}, b'a')])
    with open(tmp_path / 'in.tar', 'rb') as raw, pytest.raises(StorageError,
                                                               match='is not empty'):
        untrusted_tar.extract(raw, str(tmp_path / 'staging'))
    assert os.listdir(tmp_path / 'staging') == ['mine']
