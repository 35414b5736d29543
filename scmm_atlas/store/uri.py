"""Store URIs: local paths and ``s3://`` URIs, with the credentials/endpoint taken from the environment.

Local paths are resolved and checked so that a URI cannot escape through ``..`` segments; S3 URIs
need a bucket and a key prefix. ``AWS_ENDPOINT_URL`` (as botocore reads it) points both backends
at a non-AWS S3 service such as MinIO or moto.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from .errors import StoreError

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


def tiledb_config() -> dict[str, str]:
    """TileDB VFS settings for S3 from the standard AWS environment variables."""
    cfg: dict[str, str] = {}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        cfg["vfs.s3.region"] = region
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        cfg["vfs.s3.endpoint_override"] = parsed.netloc or endpoint
        cfg["vfs.s3.scheme"] = parsed.scheme or "https"
        cfg["vfs.s3.use_virtual_addressing"] = "false"
    return cfg


def fsspec_options() -> dict[str, object]:
    """s3fs options equivalent to :func:`tiledb_config`."""
    endpoint = s3_endpoint()
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


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
