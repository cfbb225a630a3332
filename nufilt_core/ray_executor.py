"""Matrices merged as Ray tasks: past one host, and past one process's interpreter lock on one.

The driver (the merge step) still reads, hashes, checks and writes every tensor, in order, as with the local
executor. Each matrix a parallel-safe method merges becomes one Ray task: it gets the method (put in the object
store once per step) and the matrix's inputs (through the object store), merges on one thread, and returns the
merged tensor with what the method recorded about that matrix, which the driver hands back to its own method
object (`MergeMethod.tensor_state` / `keep_tensor_state`). The output's bytes are those of the local executor on
CPUs of the same kind (one thread's arithmetic either way). A worker lost mid-task is retried by Ray; a method's
own error is not retried and reaches the caller as that error.

Addresses: HOST:PORT of a running cluster's head (`ray start --head`), `ray://HOST:PORT` for Ray Client, or
none: the RAY_ADDRESS environment variable, else a Ray instance started for this step on this host, bound to
loopback. A head that cannot be reached is an error at once (`ClusterError`, exit 78), never a wait.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import socket
from collections.abc import Callable
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import torch

from .devices import torch_threads
from .errors import ClusterError, NufiltError
from .linalg import one_blas_thread
from .methods.base import LowRank, MergeMethod

CONNECT_TIMEOUT_SECONDS = 5.0
NOT_INSTALLED = "the ray executor needs Ray: pip install 'nufilt[ray]'"
TASK_RETRIES = 3  # a worker process or node lost mid-task


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT or ray://HOST:PORT; a ClusterError for anything else."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    if parts.scheme not in ("", "ray") or not parts.hostname:
        raise ClusterError(f"ray_address {address!r}: expected HOST:PORT or ray://HOST:PORT")
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        raise ClusterError(f"ray_address {address!r}: no port (the head's GCS port, 6379 unless `ray start --head "
                           "--port` chose another; Ray Client's 10001)")
    return parts.hostname, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_ray(address: str | None) -> None:
    """Raise ClusterError when Ray is not installed, or the head at `address` does not accept a connection within a
    few seconds (Ray itself would retry for minutes). None (a local instance started on demand) is always reachable.
    Ray is not imported."""
    if importlib.util.find_spec("ray") is None:
        raise ClusterError(NOT_INSTALLED)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None or address == "auto":
        return
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS):
            pass
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {e.strerror or e} (start its head with "
                           "`ray start --head`, or set ray_address / --ray-address to the head's HOST:PORT)") from None


def import_ray(address: str | None) -> ModuleType:
    """Ray, with the settings this address needs, or a ClusterError naming the extra to install."""
    host = split_address(address)[0] if address and address != "auto" else "127.0.0.1"
    if is_loopback(host):
        # a loopback address means a head bound to loopback (one host); without this Ray replaces such an
        # address with the host's own, which that head does not answer. Read when ray is first imported
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise ClusterError(NOT_INSTALLED) from None
    return ray


def merge_matrix_task(method: MergeMethod, name: str, loaded: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                      factors: LowRank | None) -> tuple[torch.Tensor, Any]:
    """One matrix's merge in a Ray worker, on one torch and one BLAS thread as the local executor's workers."""
    with torch_threads(1), one_blas_thread():
        merged = method.merge_tensor(name, *loaded, factors)
    return merged, method.tensor_state(name)


class RayPool:
    """The step's connection to Ray: `submit` starts one matrix's task and returns the call that waits for it."""

    def __init__(self, address: str | None, method: MergeMethod):
        check_ray(address)
        self.ray = import_ray(address)
        self.started = not self.ray.is_initialized()
        if self.started:
            options: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False,
                                       "configure_logging": False}
            if address is None and not os.environ.get("RAY_ADDRESS"):
                options.update(include_dashboard=False, _node_ip_address="127.0.0.1")
            try:
                self.ray.init(address=address, **options)
            except Exception as e:  # Ray's own kinds (connection, authentication, version): a configuration error
                raise ClusterError(f"cannot join the Ray cluster at {address or 'RAY_ADDRESS/local'}: {e}") from None
        self.method = method
        self.pending: set[Any] = set()
        try:
            self.method_ref = self.ray.put(method)
            self.task = self.ray.remote(num_cpus=1, max_retries=TASK_RETRIES,
                                        retry_exceptions=False)(merge_matrix_task)
        except BaseException:
            self.close()  # never left connected: an error leaving a process joined to Ray hangs in Ray's excepthook
            raise

    @property
    def slots(self) -> int:
        """Tasks worth having in flight: the cluster's CPUs."""
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    def submit(self, name: str, loaded: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               factors: LowRank | None) -> Callable[[], torch.Tensor]:
        ref = self.task.remote(self.method_ref, name, loaded, factors)
        self.pending.add(ref)

        def result() -> torch.Tensor:
            try:
                merged, state = self.ray.get(ref)
            except self.ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, NufiltError):  # the method's own error, as the local executor raises it
                    raise e.cause from None
                raise
            finally:
                self.pending.discard(ref)
            self.method.keep_tensor_state(name, state)
            return merged

        return result

    def close(self) -> None:
        """Cancel what is still running (a failed or stopped step), and leave a cluster this step joined."""
        for ref in self.pending:
            self.ray.cancel(ref, force=True)
        self.pending.clear()
        if self.started:
            self.ray.shutdown()
