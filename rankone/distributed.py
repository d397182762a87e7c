"""Several processes under torchrun: who this process is, the process group, the few collectives rankone needs.

`torchrun --nproc-per-node N -m rankone adapt|eval|compare ...` starts N processes with
RANK, WORLD_SIZE and LOCAL_RANK set. Without them `world()` is one process and nothing
here calls torch.distributed, so the one-process path is the plain one. The process group
is gloo on the CPU and gloo + nccl (CPU tensors over gloo, CUDA tensors over nccl) when
CUDA is there; each process takes GPU LOCAL_RANK.

Rank 0 alone writes to the workspace; the others compute their share and wait for it
(`barrier`, `from_main`). When a process fails, the one that failed prints
`rank R of N failed: <error>` (the first to fail, if several do), and the others stop
without a word of their own; when a process is killed and can say nothing, the lowest
surviving rank prints the line for it. The failure is recorded in the launcher's store, which
outlives the workers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from rankone.errors import RankoneError
from rankone.workspace import process_alive

T = TypeVar("T")

TIMEOUT_VARIABLE = "RANKONE_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 1800
# Keys in the launcher's store (shared by every process of the run).
_FAILURES = "rankone/failures"
_FAILED = "rankone/failed"
_PID = "rankone/pid/{rank}"


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _environment_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise RankoneError(f"${name}={value!r}: not a whole number (set by torchrun)") from None


def world() -> World:
    """This process's rank, the number of processes and its rank on this machine, from torchrun's environment."""
    size = _environment_int("WORLD_SIZE", 1)
    rank = _environment_int("RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise RankoneError(f"$RANK={rank}, $WORLD_SIZE={size}: not a rank of the run")
    return World(rank=rank, size=size, local_rank=_environment_int("LOCAL_RANK", 0))


def rank_device(device: torch.device) -> torch.device:
    """Under several processes, a CUDA device without an index is GPU LOCAL_RANK (wrapping round when there are fewer)."""
    current = world()
    if current.distributed and device.type == "cuda" and device.index is None:
        return torch.device("cuda", current.local_rank % max(torch.cuda.device_count(), 1))
    return device


def timeout_seconds() -> int:
    """How long a collective waits for the other processes: $RANKONE_DISTRIBUTED_TIMEOUT, else 30 minutes."""
    seconds = _environment_int(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT_SECONDS)
    if seconds < 1:
        raise RankoneError(f"${TIMEOUT_VARIABLE}={seconds}: must be at least 1 (seconds)")
    return seconds


class PeerFailed(RankoneError):
    """Another process of the run failed (or the launcher stopped this one): this process has nothing of its own to say."""


def _stopped_by_launcher(signum: int, frame: Any) -> None:
    raise PeerFailed("stopped by the launcher (another process of the run ended)")


def join(device: torch.device | None = None) -> World:
    """Start the process group once when launched by torchrun (nothing for one process); returns `world()`."""
    current = world()
    if not current.distributed or dist.is_initialized():
        return current
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(device if device is not None and device.type == "cuda" else rank_device(torch.device("cuda")))
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_seconds()))
    # torchrun stops the survivors with SIGTERM when a process fails: unwind (staging folders removed) instead of vanishing.
    signal.signal(signal.SIGTERM, _stopped_by_launcher)
    store = _store()
    if store is not None:
        store.set(_PID.format(rank=current.rank), f"{socket.gethostname()} {os.getpid()}")
    return current


def leave() -> None:
    """After this process's work is done: a SIGTERM from here on (another process failing late) ends it quietly."""
    if world().distributed and dist.is_initialized():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _store():
    """The store of the default process group (torchrun's agent keeps it, so it outlives a dead worker), or None."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def _collective(run: Callable[[], T]) -> T:
    """Run a collective; a process that stopped or stopped answering makes it `PeerFailed`."""
    join()
    try:
        return run()
    except RuntimeError as error:  # DistBackendError and gloo's "connection closed" are RuntimeErrors
        raise PeerFailed(f"a collective failed ({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None


def barrier() -> None:
    """Wait for every process (nothing for one)."""
    if world().distributed:
        _collective(lambda: dist.barrier())


def sum_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over every process, in place (unchanged for one process)."""
    if world().distributed:
        _collective(lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM))
    return tensor


def sum_floats(values: Sequence[float]) -> list[float]:
    """Each value summed over every process, in float64."""
    return sum_tensor(torch.tensor(list(values), dtype=torch.float64)).tolist()


def sum_gradients(parameters: Sequence[torch.nn.Parameter]) -> None:
    """Replace each gradient by its sum over every process: one all-reduce of one flat buffer.

    Every process runs the same graph, so the same parameters have gradients everywhere.
    """
    if not world().distributed:
        return
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    if not grads:
        return
    flat = sum_tensor(torch.cat([grad.reshape(-1) for grad in grads]))
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def from_main(compute: Callable[[], T]) -> T:
    """`compute()` on rank 0 only, its result sent to every process (picklable; tensors on the CPU)."""
    current = world()
    if not current.distributed:
        return compute()
    box = [compute() if current.is_main else None]
    _collective(lambda: dist.broadcast_object_list(box, src=0, device=torch.device("cpu")))
    return box[0]


def gather(value: T) -> list[T]:
    """`value` of every process, by rank (picklable)."""
    current = world()
    if not current.distributed:
        return [value]
    found: list[Any] = [None] * current.size
    _collective(lambda: dist.all_gather_object(found, value))
    return found


def own_positions(count: int) -> range:
    """The positions 0 … count−1 this process takes when they are dealt round-robin: rank, rank + N, …"""
    current = world()
    return range(current.rank, count, current.size)


def interleave(per_rank: Sequence[Sequence[T]]) -> list[T]:
    """Undo the round-robin deal of `own_positions`: item k is item k // N of rank k mod N."""
    count = sum(len(items) for items in per_rank)
    return [per_rank[position % len(per_rank)][position // len(per_rank)] for position in range(count)]


@contextlib.contextmanager
def main_transaction(workspace) -> Iterator[Any]:
    """`workspace.transaction()` on rank 0 (the others get None and write nothing); every process leaves together."""
    if world().is_main:
        with workspace.transaction() as staging:
            yield staging
    else:
        yield None
    barrier()


# ---- launching (`rankone run` for a stage with `nproc:`) ---------------------------------------

# torchrun itself, but a failed worker ends it with exit code 1 instead of torchrun's own traceback,
# failure table and log lines: the worker has printed its one line.
_LAUNCHER = """import logging
import sys
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
try:
    main(sys.argv[1:])
except ChildFailedError:
    sys.exit(1)
"""


def launcher_command(nproc: int, arguments: Sequence[str]) -> list[str]:
    """`torchrun --standalone --nproc-per-node N -m rankone ARGUMENTS`, run by this Python."""
    return [sys.executable, "-c", _LAUNCHER, "--standalone", "--nproc-per-node", str(nproc), "-m", "rankone", *arguments]


def launcher_environment(nproc: int) -> dict[str, str]:
    """This environment, with torchrun's agent kept to errors and the CPU's threads shared among the processes
    (torchrun would set one thread each, with a warning)."""
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    return {**os.environ, "LOGLEVEL": os.environ.get("LOGLEVEL", "CRITICAL"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}


# ---- one line when a process fails ------------------------------------------------------------

def _dead_ranks(store, size: int) -> list[int]:
    """Ranks on this machine whose process is gone (others' machines cannot be looked at)."""
    host = socket.gethostname()
    dead = []
    for rank in range(size):
        key = _PID.format(rank=rank)
        try:
            if not store.check([key]):
                continue
            where, pid = store.get(key).decode().split()
        except (RuntimeError, ValueError):
            continue
        if where == host and not process_alive(int(pid)):
            dead.append(rank)
    return dead


def failure_line(error: BaseException) -> str | None:
    """The one line this process prints for `error` under several processes, or None when another process says it.

    A process's own error: the first process to fail claims the line (`store.add`), so an error
    every process hits (a bad option) is printed once. A peer's failure: silent when that peer
    recorded its own line; otherwise (killed, no word) the lowest rank still alive names the dead one.
    """
    current = world()
    if dist.is_initialized():
        # torchrun's SIGTERM may come while this is read: it must not cut the line short (the process is ending anyway).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    store = _store() if dist.is_initialized() else None
    if not isinstance(error, PeerFailed):
        line = f"rank {current.rank} of {current.size} failed: {error if isinstance(error, RankoneError) else f'{type(error).__name__}: {error}'}"
        if store is None:
            return line
        try:
            first = store.add(_FAILURES, 1) == 1
            if first:
                store.set(_FAILED, line)
        except RuntimeError:
            return line
        return line if first else None
    if store is None:
        return f"rank {current.rank} of {current.size}: {error}"
    try:
        if store.check([_FAILED]):
            return None
        dead = _dead_ranks(store, current.size)
    except RuntimeError:
        dead = []
    survivors = [rank for rank in range(current.size) if rank not in dead]
    if survivors and current.rank != survivors[0]:
        return None
    if dead:
        names = ", ".join(map(str, dead))
        return f"rank {names} of {current.size} failed: its process ended without an error (killed, or out of memory?)"
    return f"rank {current.rank} of {current.size} stopped: {error}"


def failure_exit_code(error: BaseException) -> int:
    """2 for a user's error (as in one process), 1 for anything else, a peer's failure included."""
    return 2 if isinstance(error, RankoneError) and not isinstance(error, PeerFailed) else 1
