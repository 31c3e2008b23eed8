"""datastore/backends/s3.check_fingerprint: a pinned certificate (s3-endpoint's ``fingerprint``) against a
real TLS server on loopback with a self-signed certificate made here."""
import datetime
import hashlib
import socket
import ssl
import threading

import pytest

from guestvault_engine.errors import StorageError
from guestvault_engine.datastore.backends.s3 import check_fingerprint

x509 = pytest.importorskip('cryptography.x509')
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


@pytest.fixture
def tls_server(tmp_path):
    """A TLS server on 127.0.0.1 that completes handshakes; (port, sha256 of its cert)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 's3.lab')])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    (tmp_path / 'cert.pem').write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / 'key.pem').write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / 'cert.pem', tmp_path / 'key.pem')
    listener = socket.create_server(('127.0.0.1', 0))
    stop = threading.Event()

    def serve():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _addr = listener.accept()
            except socket.timeout:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    yield listener.getsockname()[1], digest
    stop.set()
    thread.join()
    listener.close()


def test_the_pinned_certificate_is_accepted_in_pbs_spelling(tls_server):
    port, digest = tls_server
    pretty = ':'.join(digest[i:i + 2] for i in range(0, 64, 2)).upper()
    check_fingerprint(f'https://127.0.0.1:{port}', pretty)
    check_fingerprint(f'https://127.0.0.1:{port}', digest)


def test_another_certificate_is_refused_naming_the_one_found(tls_server):
    port, digest = tls_server
    with pytest.raises(StorageError, match='has fingerprint ' + digest[:2]):
        check_fingerprint(f'https://127.0.0.1:{port}', 'ab' * 32)


def test_a_fingerprint_on_plain_http_is_refused():
    with pytest.raises(StorageError, match='is not https'):
        check_fingerprint('http://127.0.0.1:9', 'ab' * 32)
