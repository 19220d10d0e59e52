"""Serving many replicas: a router, worker processes, policies, health, versions, security.

Lessons 05-08 use these modules: ``router`` and ``worker`` (real processes on loopback sockets, each
worker serving with the engine of lesson 15, ``lessons_lib.engine``),
``policies`` and ``simulate`` (load balancing), ``health`` (failure detection, retries,
exactly-once), ``faults`` (fault injection), ``fingerprint`` and ``versioning`` (consistency),
``security`` and ``pii``.
"""

from .protocol import MessageTooLarge, Request, Response
from .router import (DuplicateRequestId, NoWorkerError, RequestFailed, RequestQuarantined, Router, RouterClosed,
                     WorkerSpec)

__all__ = ["DuplicateRequestId", "MessageTooLarge", "NoWorkerError", "Request", "RequestFailed",
           "RequestQuarantined", "Response", "Router", "RouterClosed", "WorkerSpec"]
