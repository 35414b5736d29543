"""Store URIs: local paths and ``s3://`` URIs, with the credentials/endpoint taken from the environment.

Local paths are resolved and checked so that a URI cannot escape through ``..`` segments; S3 URIs
need a bucket and a key prefix. ``AWS_ENDPOINT_URL`` (as botocore reads it) points both backends
at a non-AWS S3 service such as MinIO or moto.

Object stores fail transiently (500 InternalError, 503 SlowDown, resets, timeouts), and one
failed request would otherwise end an ingest or a training run hours in, so both S3 clients
retry each request with capped exponential backoff: s3fs through botocore's "standard" retry
mode, TileDB through its VFS retry settings. A retried request reads or writes the same bytes
again (whole objects, multipart parts), so retries cannot change what is stored. Environment
variables override the defaults (local stores are not affected):

``SCMM_ATLAS_S3_MAX_ATTEMPTS``
    attempts per request, the first included (default 8: with backoff capped at 20 s this rides
    out about a minute of throttling). s3fs adds its own few attempts on top for reads cut off
    mid-body and SlowDown replies.
``SCMM_ATLAS_S3_CONNECT_TIMEOUT``, ``SCMM_ATLAS_S3_READ_TIMEOUT``
    seconds to connect, and to wait for a response's next bytes, before the attempt counts as
    failed (default: each library's own, s3fs 5 s and 15 s, TileDB 10.8 s and 3 s).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from ..errors import StoreError
from ..settings import settings

if TYPE_CHECKING:
    import zarr


@dataclass(frozen=True)
class StoreURI:
    """A validated store location."""

    uri: str

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    @property
    def path(self) -> Path:
        if self.is_s3:
            raise ValueError("an s3:// URI has no local path")
        return Path(self.uri)

    def child(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}"

    def __str__(self) -> str:
        return self.uri


def parse_uri(uri: str | os.PathLike[str]) -> StoreURI:
    """Validate ``uri`` and return it normalised (absolute local path, or ``s3://bucket/prefix``)."""
    text = os.fspath(uri)
    if not text:
        raise StoreError("<empty>", "uri", "a store URI is required")
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        key = parsed.path.strip("/")
        if not parsed.netloc or not key:
            raise StoreError(text, "uri", "an S3 store needs a bucket and a prefix: s3://BUCKET/PREFIX")
        if any(part in ("..", ".") for part in key.split("/")):
            raise StoreError(text, "uri", "'.' and '..' segments are not allowed in an S3 key")
        return StoreURI(f"s3://{parsed.netloc}/{key}")
    if parsed.scheme in ("", "file"):
        raw = parsed.path if parsed.scheme == "file" else text
        if ".." in Path(raw).parts:
            raise StoreError(text, "uri", "'..' segments are not allowed in a store path")
        return StoreURI(str(Path(raw).expanduser().resolve()))
    raise StoreError(text, "uri", f"unsupported scheme {parsed.scheme!r}: use a local path or s3://")


AWS_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")


def aws_settings() -> dict[str, str]:
    """The non-secret AWS settings set here (endpoint, region, profile name), handed to Ray workers
    that open ``s3://`` stores. Credentials are never handed on: Ray records a task's runtime
    environment in its logs and state API. Workers take theirs from their own environment (a local
    Ray inherits the driver's at start) or from the node's role (IAM instance profile, IRSA)."""
    return {k: os.environ[k] for k in AWS_SETTINGS if k in os.environ}


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_retry_settings() -> tuple[int, float | None, float | None]:
    """Attempts per request and the connect / read timeouts in seconds (None: the library's default)."""
    env = settings()
    return env.s3_max_attempts, env.s3_connect_timeout, env.s3_read_timeout


def tiledb_config() -> dict[str, str]:
    """TileDB VFS settings for S3 from the standard AWS environment variables, with retries.

    TileDB retries a request ``connect_max_tries`` times after the first attempt, waiting
    ``2**retry * connect_scale_factor`` ms (its default 25 ms: 50 ms, 100 ms, ... 3.2 s by the 7th),
    and retries SlowDown replies on its own schedule whatever the setting."""
    attempts, connect_s, read_s = s3_retry_settings()
    cfg: dict[str, str] = {"vfs.s3.connect_max_tries": str(attempts - 1)}
    if connect_s is not None:
        cfg["vfs.s3.connect_timeout_ms"] = str(max(1, round(connect_s * 1000)))
    if read_s is not None:
        cfg["vfs.s3.request_timeout_ms"] = str(max(1, round(read_s * 1000)))
    if region := _region():
        cfg["vfs.s3.region"] = region
    if endpoint := _endpoint_parts():
        cfg["vfs.s3.endpoint_override"], cfg["vfs.s3.scheme"] = endpoint
        cfg["vfs.s3.use_virtual_addressing"] = "false"
    return cfg


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def _endpoint_parts() -> tuple[str, str] | None:
    """(host:port, scheme) of the S3 endpoint, for the clients that take them apart (TileDB, pyarrow)."""
    endpoint = s3_endpoint()
    if not endpoint:
        return None
    parsed = urlparse(endpoint)
    return parsed.netloc or endpoint, parsed.scheme or "https"


def fsspec_options() -> dict[str, object]:
    """s3fs options equivalent to :func:`tiledb_config`: botocore's standard retry mode (exponential
    backoff with jitter, capped at 20 s; retries 500/502/503/504, throttling, resets and timeouts)."""
    attempts, connect_s, read_s = s3_retry_settings()
    config: dict[str, object] = {"retries": {"total_max_attempts": attempts, "mode": "standard"}}
    if connect_s is not None:
        config["connect_timeout"] = connect_s
    if read_s is not None:
        config["read_timeout"] = read_s
    # max_concurrency 1: s3fs splits only objects over 50 MiB into parallel ranged reads, and to know
    # the size it sends a HEAD before every GET; our chunks are far smaller, so that HEAD doubled the
    # requests (and the round trips) of every chunk read.
    options: dict[str, object] = {"config_kwargs": config, "max_concurrency": 1}
    endpoint = s3_endpoint()
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def arrow_s3(uri: str) -> tuple[Any, str]:
    """pyarrow's S3 filesystem (how Ray Train writes checkpoints) with the endpoint, region and
    retries of :func:`fsspec_options`, and the path inside it. Credentials come from each process's
    own environment or role, never from the (pickled, shipped to workers) filesystem object."""
    import pyarrow.fs

    attempts, connect_s, read_s = s3_retry_settings()
    kwargs: dict[str, Any] = {"retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=attempts)}
    if endpoint := _endpoint_parts():
        kwargs["endpoint_override"], kwargs["scheme"] = endpoint
    if region := _region():
        kwargs["region"] = region
    if connect_s is not None:
        kwargs["connect_timeout"] = connect_s
    if read_s is not None:
        kwargs["request_timeout"] = read_s
    return pyarrow.fs.S3FileSystem(**kwargs), uri.removeprefix("s3://")


def filesystem(uri: str) -> tuple[Any, str]:
    """An fsspec filesystem and path for a local path or ``s3://`` URI (S3 with :func:`fsspec_options`)."""
    import fsspec.core

    return fsspec.core.url_to_fs(uri, **(fsspec_options() if uri.startswith("s3://") else {}))


def zarr_store(uri: StoreURI, *, read_only: bool) -> zarr.abc.store.Store:
    """A Zarr store object for ``uri`` (local folder or S3 through fsspec)."""
    import zarr.storage  # here, not at the top: most users of this module never touch Zarr

    if uri.is_s3:
        return zarr.storage.FsspecStore.from_url(uri.uri, storage_options=fsspec_options(), read_only=read_only)
    return zarr.storage.LocalStore(uri.path, read_only=read_only)
