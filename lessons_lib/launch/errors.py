"""The one exception a caller of :func:`run_distributed` sees when ranks fail."""

from __future__ import annotations


class DistributedError(RuntimeError):
    """A distributed call failed on at least one rank.

    Attributes:
        rank: the first rank that failed (the first whose failure reached the caller).
        kind: ``"exception"`` (``fn`` raised), ``"killed"`` (the process died),
            ``"timeout"`` (no answer within ``timeout`` seconds, e.g. a hang in a
            collective), ``"startup"`` (the ranks could not start or join the group)
            or ``"unpicklable"`` (the return value cannot be sent back).
        remote_type: name of the exception type raised on the rank, if any.
        remote_traceback: the traceback text formatted on that rank, if any.
        failed_ranks: every rank known to have failed when the call was stopped.
        stacks: for a timeout, where each unfinished rank was: ``{rank: text}``.
        missing_ranks: for a timeout, the ranks that were not inside the
            ``torch.distributed`` call the others waited in (still busy elsewhere,
            or already returned): usually the ones to look at first.
        native_stderr: what ranks wrote to their native standard error (file
            descriptor 2, below Python: C++ libraries such as gloo, a C++
            ``terminate``, a fatal signal) during the call: ``{rank: text}``, for the
            ranks that wrote anything. A rank killed by ``SIGABRT`` usually says why here.
        summary: the message without tracebacks or stacks, one paragraph.
    """

    def __init__(self, message: str, *, rank: int, kind: str,
                 remote_type: str | None = None, remote_traceback: str | None = None,
                 failed_ranks: tuple[int, ...] = (), stacks: dict[int, str] | None = None,
                 missing_ranks: tuple[int, ...] = (), native_stderr: dict[int, str] | None = None):
        self.rank = rank
        self.kind = kind
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback
        self.failed_ranks = tuple(failed_ranks) or (rank,)
        self.stacks = dict(stacks or {})
        self.missing_ranks = tuple(missing_ranks)
        self.native_stderr = {r: t for r, t in (native_stderr or {}).items() if t.strip()}
        full = message
        if remote_traceback:
            full += f"\n\n--- traceback on rank {rank} ---\n{remote_traceback.rstrip()}"
        for where_rank, text in sorted(self.stacks.items()):
            full += f"\n\n--- where rank {where_rank} was (innermost call last) ---\n{text.rstrip()}"
        for err_rank, text in sorted(self.native_stderr.items()):
            full += f"\n\n--- what rank {err_rank} wrote to its native stderr ---\n{text.rstrip()}"
        super().__init__(full)
        self.summary = message
