"""Environment settings, read in one place (scvi-tools' ``_settings.py`` is the model).

Every ``SCMM_ATLAS_*`` variable the package reads is a field of :class:`Settings` (pydantic-settings:
typed, checked, an empty value counts as unset), read when :func:`settings` is called, never at import,
so that a variable set later (a test, a Ray job's runtime environment) takes effect. A bad value is one
:class:`~.errors.InputError` naming the variable. Variables of other tools (``RAY_ADDRESS``,
``MLFLOW_TRACKING_URI``, ``AWS_*``) keep their own names and readers.

- ``SCMM_ATLAS_DATA``: the real datasets' folder (the demo, pipeline configs' ``{data}``);
- ``SCMM_ATLAS_LEASE_TTL_S``: how long a store lease outlives its last heartbeat (120 s);
- ``SCMM_ATLAS_RESULTS_RETAIN_S``: how long a superseded results version stays readable (3600 s);
- ``SCMM_ATLAS_RAY_DASHBOARD``: a local Ray's dashboard and job server (on; ``0`` turns them off);
- ``SCMM_ATLAS_S3_MAX_ATTEMPTS``, ``SCMM_ATLAS_S3_CONNECT_TIMEOUT``, ``SCMM_ATLAS_S3_READ_TIMEOUT``: S3
  retries and timeouts (the libraries' defaults where unset; 8 attempts);
- ``SCMM_ATLAS_FAULTS``: fault injection for the fault-tolerance tests (:mod:`.faults`).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import InputError

PREFIX = "SCMM_ATLAS_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, env_ignore_empty=True, extra="ignore")

    data: Path | None = None
    lease_ttl_s: float = Field(120.0, gt=0)
    results_retain_s: float = Field(3600.0, ge=0)
    ray_dashboard: bool = True
    s3_max_attempts: int = Field(8, ge=1)
    s3_connect_timeout: float | None = Field(None, gt=0)
    s3_read_timeout: float | None = Field(None, gt=0)
    faults: str = ""


def settings() -> Settings:
    """The settings as the environment holds them now."""
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        name = PREFIX + "_".join(str(p) for p in first["loc"]).upper()
        raise InputError(name, "environment", f"{first['msg']} (got {first['input']!r})") from None
