"""Serving many replicas: a router, worker processes, policies, health, versions, security.

Lessons 05-08 use these modules: ``router`` and ``worker`` (real processes on loopback sockets),
``policies`` and ``simulate`` (load balancing), ``health`` (failure detection, retries,
exactly-once), ``fingerprint`` and ``versioning`` (consistency), ``security`` and ``pii``.
"""

from .protocol import Request, Response
from .router import NoWorkerError, Router, WorkerSpec

__all__ = ["NoWorkerError", "Request", "Response", "Router", "WorkerSpec"]
