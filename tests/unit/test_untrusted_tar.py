"""run/untrusted_tar: a tar stream made from a guest's filesystem never writes outside its
directory, and what it may write comes out whole; file_restore's own input checks."""
import io
import os
import stat
import tarfile

import pytest

from guestvault_engine.errors import ConfigError
from guestvault_engine.run import untrusted_tar
from guestvault_engine.run.file_restore import normalize_path, parse_size


def make_tar(path, members):
    """members: (TarInfo fields, data) with data None for non-files; then zeroes, as on the
    appliance's output disk. Returns the stream's length."""
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


def extract(tmp_path, members):
    length = make_tar(tmp_path / 'in.tar', members)
    staging = tmp_path / 'staging'
    staging.mkdir()
    return untrusted_tar.extract(str(tmp_path / 'in.tar'), length, str(staging)), staging


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
                      'skipped': []}


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
    assert counts['skipped'] == ['dev/sda', 'run/fifo']
    assert not (staging / 'dev' / 'sda').exists() and not (staging / 'run' / 'fifo').exists()
    assert stat.S_IMODE((staging / 'usr' / 'bin' / 'su').stat().st_mode) == 0o755


def test_a_stream_cut_short_is_an_error_not_a_short_file(tmp_path):
    make_tar(tmp_path / 'in.tar', [({'name': './a'}, b'a' * 1000)])
    staging = tmp_path / 'staging'
    staging.mkdir()
    with pytest.raises(tarfile.ReadError):
        untrusted_tar.extract(str(tmp_path / 'in.tar'), 512 + 600, str(staging))


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


def test_the_stream_ends_after_its_last_member_and_two_zero_blocks(tmp_path):
    make_tar(tmp_path / 'in.tar', [({'name': './a'}, b'a' * 1000), ({'name': './b'}, b'')])
    # a: header + 1024 bytes of padded data; b: a header; then the two zero blocks
    assert untrusted_tar.stream_length(str(tmp_path / 'in.tar')) == 512 + 1024 + 512 + 1024
    (tmp_path / 'junk').write_bytes(b'\x01' * 4096)
    with pytest.raises(untrusted_tar.UnsafeMember, match='unreadable'):
        untrusted_tar.stream_length(str(tmp_path / 'junk'))
