"""One place that makes MLflow clients for the daemon, and reads MLflow errors.

`import mlflow` takes seconds, so it happens inside `registry_client`, never at import time.

MLflow's REST client retries each request itself (7 times with back-off factor 2 by default, and
a 120 s timeout): with MLflow down, one call would block for minutes, the source's own back-off
and the error metric would lag far behind, and stop() would hang. We set shorter defaults —
only where the user has not set these variables — and do the patient retrying ourselves. We also
keep MLflow from writing progress bars and "View run at" lines to stdout, which carries the
daemon's JSON logs.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient

CLIENT_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}

_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def registry_client(tracking_uri: str) -> MlflowClient:
    """A client for tracking and registry at `tracking_uri` (one per thread: they hold sessions)."""
    for key, value in CLIENT_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def error_code(exc: BaseException) -> str | None:
    """MLflow's error code ("RESOURCE_DOES_NOT_EXIST", ...) of an MlflowException, else None."""
    return getattr(exc, "error_code", None)


def redact(text: str) -> str:
    """Drop `user:password@` from any URL in an error message before it is logged."""
    return _USERINFO.sub("***@", text)


def describe_error(exc: BaseException, limit: int = 500) -> str:
    """A one-line, credential-free summary of an exception for logs and status."""
    message = " ".join(str(exc).split())
    if len(message) > limit:
        message = message[:limit] + "…"
    return redact(f"{type(exc).__name__}: {message}")
