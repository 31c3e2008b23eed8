"""One S3 bucket, through boto3: objects put, got, listed and deleted, with errors a user can act on.

This is the only place that speaks S3. It knows keys and bytes, nothing of what they hold:
- requests are signed and retried by botocore (``standard`` retry mode: 5xx answers, throttling
  and time-outs are retried with exponential backoff and jitter), so nothing here signs or
  sleeps by itself;
- ``put_new`` is a conditional put (``If-None-Match: *``): of two nodes writing the same chunk at
  once, one creates it and the other is told it exists, so neither overwrites the other;
- a refused signature, a missing bucket or an unreachable endpoint becomes a ``StorageError``
  that says which setting to fix, never a botocore traceback; the secret never appears in one.
"""
from __future__ import annotations

import hashlib
import os
import socket
import ssl
import warnings
from urllib.parse import urlparse

from ...errors import MissingLibrary, StorageError

# Attempts per request, the first included: at botocore's backoff (up to 20 s between tries)
# about a minute of a gateway that does not answer before the error reaches the user.
# GUESTVAULT_S3_ATTEMPTS changes it (tests shorten the wait for a dead endpoint).
MAX_ATTEMPTS = 6
CONNECT_TIMEOUT = 10
READ_TIMEOUT = 60
# Connections per client: uploads and restores run this many requests at once.
MAX_POOL = 32
DELETE_BATCH = 1000          # the most keys one DeleteObjects request takes

_AUTH_CODES = {'InvalidAccessKeyId', 'SignatureDoesNotMatch', 'AccessDenied', 'Forbidden',
               'InvalidToken', 'ExpiredToken', '403'}


def _boto3():
    try:
        import boto3
        from botocore.config import Config
        from botocore import exceptions
    except ImportError as exc:
        raise MissingLibrary('boto3', 'a datastore on S3', debian_package='python3-boto3',
                             error=exc) from None
    return boto3, Config, exceptions


class S3Bucket:
    """A bucket on an endpoint (``policy.config.S3Endpoint``); thread-safe (one boto3 client)."""

    def __init__(self, endpoint, bucket, max_attempts=None):
        boto3, Config, exceptions = _boto3()
        if max_attempts is None:
            max_attempts = int(os.environ.get('GUESTVAULT_S3_ATTEMPTS') or MAX_ATTEMPTS)
        self.max_attempts = max_attempts
        self._exceptions = exceptions
        self.endpoint = endpoint
        self.bucket = bucket
        self.label = f"bucket {bucket} on {endpoint.url}"
        verify = endpoint.ca_file or None
        if endpoint.fingerprint:
            check_fingerprint(endpoint.url, endpoint.fingerprint)
            verify = False  # pinned above: the certificate is the one the fingerprint names
            # ... so urllib3's warning about unverified requests would only mislead
            warnings.filterwarnings('ignore', message='Unverified HTTPS request')
        config = Config(
            # total_max_attempts counts the first request too (max_attempts would not)
            retries={'total_max_attempts': max_attempts, 'mode': 'standard'},
            connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
            max_pool_connections=MAX_POOL,
            s3={'addressing_style': 'path' if endpoint.path_style else 'virtual'},
            # Content-MD5 on every upload (DeleteObjects needs it), no newer trailing checksums
            # that not every S3 implementation understands.
            request_checksum_calculation='when_required',
            response_checksum_validation='when_required',
        )
        self._client = boto3.session.Session().client(
            's3', endpoint_url=endpoint.url, region_name=endpoint.region,
            aws_access_key_id=endpoint.access_key, aws_secret_access_key=endpoint.secret_key,
            config=config, verify=verify)

    # -- errors ---------------------------------------------------------------------------------
    def _error(self, exc, action, key=None):
        """The StorageError for a failed request (never naming the secret)."""
        what = f"{self.label}: cannot {action}" + (f" {key}" if key else '')
        exceptions = self._exceptions
        if isinstance(exc, exceptions.ClientError):
            code = str(exc.response.get('Error', {}).get('Code', ''))
            status = exc.response.get('ResponseMetadata', {}).get('HTTPStatusCode')
            if code in _AUTH_CODES or status == 403:
                return StorageError(
                    f"{what}: the endpoint refused the credentials ({code or status}); check "
                    f"access-key and secret-key (or secret-key-file) of s3-endpoint "
                    f"{self.endpoint.id} in storage.cfg, and that the key may use the bucket")
            if status and status >= 500:
                return StorageError(
                    f"{what}: the endpoint answered {code or status} to all "
                    f"{self.max_attempts} attempts; the S3 service is failing (check its "
                    "health and capacity)")
            if code == 'NoSuchBucket' or (code in ('404', 'NotFound') and key is None):
                return StorageError(f"{self.label} does not exist; create the bucket first, or "
                                    "fix bucket= in the datastore's backend")
            return StorageError(f"{what}: {code or status} "
                                f"{exc.response.get('Error', {}).get('Message', '')}".rstrip())
        if isinstance(exc, (exceptions.EndpointConnectionError,
                            exceptions.ConnectTimeoutError)):
            return StorageError(f"{what}: the endpoint {self.endpoint.url} cannot be reached "
                                f"after {self.max_attempts} attempts ({exc}); check endpoint and "
                                f"port of s3-endpoint {self.endpoint.id}, and the network")
        if isinstance(exc, exceptions.BotoCoreError):
            return StorageError(f"{what}: {exc}")
        return StorageError(f"{what}: {exc}")

    def _call(self, action, key, function, **kwargs):
        try:
            return function(Bucket=self.bucket, **kwargs)
        except (self._exceptions.BotoCoreError, self._exceptions.ClientError) as exc:
            raise self._error(exc, action, key) from None

    @staticmethod
    def _code(exc):
        return str(exc.response.get('Error', {}).get('Code', ''))

    # -- objects --------------------------------------------------------------------------------
    def check(self):
        """StorageError unless the bucket exists and the credentials may use it."""
        self._call('reach', None, self._client.head_bucket)

    def put(self, key, data):
        self._call('upload', key, self._client.put_object, Key=key, Body=bytes(data))

    def put_new(self, key, data):
        """Create ``key`` unless it exists: True when this call created it."""
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data),
                                    IfNoneMatch='*')
            return True
        except self._exceptions.ClientError as exc:
            status = exc.response.get('ResponseMetadata', {}).get('HTTPStatusCode')
            if status == 412 or self._code(exc) in ('PreconditionFailed', '412'):
                return False
            # Another writer's put of the same key still in flight: it exists, or soon will.
            if status == 409 or self._code(exc) == 'ConditionalRequestConflict':
                return False
            raise self._error(exc, 'upload', key) from None
        except self._exceptions.BotoCoreError as exc:
            raise self._error(exc, 'upload', key) from None

    def get(self, key):
        """The object's bytes, or None when there is no such key."""
        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=key)
            return answer['Body'].read()
        except self._exceptions.ClientError as exc:
            if self._code(exc) in ('NoSuchKey', '404'):
                return None
            raise self._error(exc, 'download', key) from None
        except self._exceptions.BotoCoreError as exc:
            raise self._error(exc, 'download', key) from None

    def head(self, key):
        """``{'size', 'etag', 'modified'}`` of the object, or None when there is no such key."""
        try:
            answer = self._client.head_object(Bucket=self.bucket, Key=key)
        except self._exceptions.ClientError as exc:
            if self._code(exc) in ('NoSuchKey', '404', 'NotFound'):
                return None
            raise self._error(exc, 'look up', key) from None
        except self._exceptions.BotoCoreError as exc:
            raise self._error(exc, 'look up', key) from None
        return {'size': answer['ContentLength'], 'etag': answer['ETag'].strip('"'),
                'modified': answer['LastModified'].timestamp()}

    def copy(self, source, key):
        self._call('copy', source, self._client.copy_object, Key=key,
                   CopySource={'Bucket': self.bucket, 'Key': source})

    def objects(self, prefix=''):
        """``(key, size, etag, modified epoch)`` of every object under ``prefix``, key order."""
        pages = self._client.get_paginator('list_objects_v2')
        try:
            for page in pages.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get('Contents', ()):
                    yield (item['Key'], item['Size'], item.get('ETag', '').strip('"'),
                           item['LastModified'].timestamp())
        except (self._exceptions.BotoCoreError, self._exceptions.ClientError) as exc:
            raise self._error(exc, 'list', prefix or '/') from None

    def folders(self, prefix):
        """The names of the "folders" right under ``prefix`` (which ends in ``/``)."""
        pages = self._client.get_paginator('list_objects_v2')
        names = []
        try:
            for page in pages.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter='/'):
                for item in page.get('CommonPrefixes', ()):
                    names.append(item['Prefix'][len(prefix):].rstrip('/'))
        except (self._exceptions.BotoCoreError, self._exceptions.ClientError) as exc:
            raise self._error(exc, 'list', prefix) from None
        return names

    def delete(self, keys):
        """Delete ``keys`` (any number) with multi-object deletes; a missing key is no error."""
        keys = list(keys)
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{'Key': key} for key in keys[start:start + DELETE_BATCH]]
            answer = self._call('delete', batch[0]['Key'], self._client.delete_objects,
                                Delete={'Objects': batch, 'Quiet': True})
            failed = [e for e in answer.get('Errors', ()) if e.get('Code') != 'NoSuchKey']
            if failed:
                raise StorageError(f"{self.label}: cannot delete {failed[0].get('Key')}: "
                                   f"{failed[0].get('Code')} {failed[0].get('Message', '')}")


def check_fingerprint(url, fingerprint):
    """StorageError unless the TLS certificate at ``url`` has this sha256 fingerprint (PBS's
    ``fingerprint``: hex pairs, colons optional), for endpoints with a self-signed certificate."""
    parsed = urlparse(url)
    if parsed.scheme != 'https':
        raise StorageError(f"fingerprint is set for {url}, which is not https; remove it or "
                           "use an https endpoint")
    wanted = fingerprint.replace(':', '').lower()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443),
                                      timeout=CONNECT_TIMEOUT) as raw:
            with context.wrap_socket(raw, server_hostname=parsed.hostname) as tls:
                der = tls.getpeercert(binary_form=True)
    except OSError as exc:
        raise StorageError(f"cannot reach {url} to check its certificate: {exc}") from None
    found = hashlib.sha256(der).hexdigest()
    if found != wanted:
        pretty = ':'.join(found[i:i + 2] for i in range(0, len(found), 2))
        raise StorageError(f"the certificate of {url} has fingerprint {pretty}, not the one "
                           "storage.cfg names; refusing to send data there")
