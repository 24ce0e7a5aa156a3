"""The cluster's S3-compatible bucket, through pyarrow's S3 filesystem: immutable objects put, listed and read."""

from __future__ import annotations

from functools import cached_property
from urllib.parse import urlparse

import pyarrow.fs as pafs

from flen_resources.deployment import S3_ENDPOINT_ENV, SECRETS_FILE_ENV, ClusterSettings, cluster_settings, setting

# The S3 keys' variables, read from the environment or the secrets file (deployment.setting).
S3_KEY_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# What S3 servers answer a wrong or unknown key with (AWS, MinIO, moto), as pyarrow reports it.
_REFUSED = ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden")


class BucketError(OSError):
    """The bucket cannot be reached or refused a request; the message names the endpoint and the fix."""


class MissingObject(BucketError):
    """An object the project recorded is gone from the bucket."""


def s3_credentials() -> dict[str, str]:
    """The S3 keys from the environment or the secrets file, as environment variables (for DVC's subprocess)."""
    return {var: value for var in S3_KEY_ENV if (value := setting(var))}


class Bucket:
    """The project's folder in the bucket (bucket/prefix/...)."""

    def __init__(self, settings: ClusterSettings):
        self.settings = settings

    @cached_property
    def fs(self) -> pafs.S3FileSystem:
        keys = s3_credentials()
        options: dict = {"region": self.settings.region, "connect_timeout": 5, "request_timeout": 30,
                         "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=2)}
        if keys.get("AWS_ACCESS_KEY_ID"):
            options.update(access_key=keys["AWS_ACCESS_KEY_ID"], secret_key=keys.get("AWS_SECRET_ACCESS_KEY"),
                           session_token=keys.get("AWS_SESSION_TOKEN"))
        if self.settings.endpoint_url:
            url = urlparse(self.settings.endpoint_url)
            options.update(endpoint_override=url.netloc or url.path, scheme=url.scheme or "https")
        return pafs.S3FileSystem(**options)

    def _error(self, exc: Exception, doing: str) -> BucketError:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if any(code in reason for code in _REFUSED):
            return BucketError(f"the {self.settings.bucket_where} refused the credentials: {reason}: check "
                               f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the file {SECRETS_FILE_ENV} names)")
        return BucketError(f"cannot {doing} the {self.settings.bucket_where}: {reason}: check {S3_ENDPOINT_ENV}, "
                           "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and that the server runs")

    def check(self) -> None:
        """Fail with one line naming the endpoint when the bucket cannot be listed."""
        try:
            info = self.fs.get_file_info(self.settings.bucket)
        except OSError as exc:
            raise self._error(exc, "reach") from exc
        if info.type != pafs.FileType.Directory:
            raise BucketError(f"the {self.settings.bucket_where} does not exist: create it "
                              f"(`aws s3 mb s3://{self.settings.bucket}`), or set FLEN_S3_BUCKET to one that does")

    def put(self, key: str, data: bytes) -> None:
        """Write one object (an S3 PUT: whole or absent, never half)."""
        try:
            with self.fs.open_output_stream(key) as out:
                out.write(data)
        except OSError as exc:
            raise self._error(exc, "write to") from exc

    def get(self, key: str) -> bytes:
        """Read one object; MissingObject when it is gone."""
        try:
            with self.fs.open_input_stream(key) as src:
                return src.read()
        except FileNotFoundError as exc:
            raise MissingObject(f"the object s3://{key} is missing from the {self.settings.bucket_where}") from exc
        except OSError as exc:
            raise self._error(exc, "read from") from exc

    def names(self, folder: str) -> set[str]:
        """The names of the objects directly under a folder key ({} when there are none)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        except OSError as exc:
            raise self._error(exc, "list") from exc
        return {i.base_name for i in infos if i.type == pafs.FileType.File}


def cluster_bucket() -> Bucket | None:
    """The bucket of the `cluster` deployment (None in `local`)."""
    settings = cluster_settings()
    return Bucket(settings) if settings else None
