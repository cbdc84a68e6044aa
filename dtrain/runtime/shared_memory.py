"""DDP's gradient all-reduce through shared memory, for CPU ranks that share a host.

Gloo between processes on one host still goes through loopback TCP, and on the 2-core test
machine that is bound by latency: an all-reduce of the MNIST CNN's 1.7 MB of gradients took
1.5-3 ms and a barrier alone 0.5-1 ms, while a 2-process step computes in about 62 ms
(bench/RESULTS.md). Here every rank copies its bucket into its own slot of one shared buffer,
publishes a sequence number, waits for everyone's, and sums the slots: no sockets, no threads.
Two sets of slots alternate, so a rank that is one bucket ahead never overwrites a slot that a
slower rank is still reading. A rank that waits watches the processes it waits for, as gloo's
closed sockets would tell it: a rank killed mid-step (a lost node of a job whose nodes share a
host, as the local SLURM's do) fails the others at once, not after the collective time-out.
"""

import os
import platform
import secrets
import tempfile
import time

import torch
import torch.distributed as dist

from dtrain.runtime.dist import PEER_GONE

SHM_DIR = "/dev/shm"
HEADER = 256  # int64 words: a token that proves every rank mapped the same file, then per rank its sequence number,
MAX_RANKS = 63  # its PID and its process's start time
PATH_BYTES = 256
DDP_BUCKET_NUMEL = 25 * 2**20 // 4  # DDP's default bucket_cap_mb (25) in float32s; a bucket exceeds it by one tensor at most
SPIN_S, SLEEP_S = 0.002, 0.00005
WATCH_S = 0.5  # how often a waiting rank looks at the processes it waits for


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot), or None if it is not running: a PID and its
    start time name one process, even once the PID is reused."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()  # after the command's name, which may hold anything
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def slot_numel(parameter_numels: list[int]) -> int:
    """Room for DDP's largest bucket of these parameters, not for all of them: every rank's slot is
    in every rank's memory twice, and a large model's gradients would not fit in /dev/shm."""
    return min(sum(parameter_numels), DDP_BUCKET_NUMEL + max(parameter_numels, default=0))


def reserved_file(nbytes: int) -> str:
    """A new file of `nbytes` in /dev/shm with its memory allocated now, or "" if it would take over
    half of what is free: a /dev/shm too small for it (64 MB in a default Docker container) must
    fail here, not as a SIGBUS in the middle of a backward pass."""
    free = os.statvfs(SHM_DIR)
    if nbytes > free.f_bavail * free.f_frsize // 2:
        return ""
    fd, name = tempfile.mkstemp(prefix="dtrain-grads-", dir=SHM_DIR)
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return name
    except OSError:
        os.unlink(name)
        return ""
    finally:
        os.close(fd)


def for_ddp(rank: int, world_size: int, device: torch.device, parameter_numels: list[int],
            timeout_s: float) -> "SharedMemoryAllReduce | None":
    """Collective: the buffer DDP's CPU ranks average their gradients through, or None where DDP keeps
    its process group (GPUs, a world of one, ranks that do not share a host). A rank that waits
    `timeout_s` for the others fails as a timed-out collective of the process group would."""
    if device.type != "cpu" or world_size == 1:
        return None
    return SharedMemoryAllReduce.create(rank, world_size, slot_numel(parameter_numels), timeout_s)


class SharedMemoryAllReduce:
    """The DDP comm hook's state: a shared buffer with room for `numel` float32s per rank and slot set."""

    label = "shared-memory gradient all-reduce"

    def __init__(self, buffer: torch.Tensor, rank: int, world_size: int, numel: int, timeout_s: float):
        words = buffer[:HEADER * 2].view(torch.int64)
        self.sequence = words[1:1 + world_size]
        self.pids = words[1 + MAX_RANKS:1 + MAX_RANKS + world_size]
        self.starts = words[1 + 2 * MAX_RANKS:1 + 2 * MAX_RANKS + world_size]
        self.slots = buffer[HEADER * 2:].view(2, world_size, numel)
        self.rank, self.world_size, self.timeout_s, self.last = rank, world_size, timeout_s, 0
        self.watching = False  # whether this rank sees the others' processes (one PID namespace)
        self.waited_s = 0.0  # for the time each rank spends waiting for the others (dtrain.runtime.performance)

    @classmethod
    def create(cls, rank: int, world_size: int, numel: int, timeout_s: float) -> "SharedMemoryAllReduce | None":
        """Collective: the shared buffer if every rank can map the one that rank 0 made, else None.

        Only on x86-64, whose stores become visible to other cores in program order: a rank that
        sees another's sequence number then sees the slot written before it.
        """
        size = HEADER * 2 + 2 * world_size * numel
        path = torch.zeros(PATH_BYTES, dtype=torch.uint8)
        usable = platform.machine() in ("x86_64", "AMD64") and os.path.isdir(SHM_DIR) and world_size <= MAX_RANKS
        if rank == 0 and usable and (name := reserved_file(size * 4)):
            path[:len(name.encode())] = torch.tensor(list(name.encode()), dtype=torch.uint8)
        dist.broadcast(path, src=0)
        name = bytes(path[path > 0].tolist()).decode()
        buffer = torch.from_file(name, shared=True, size=size, dtype=torch.float32) if os.path.isfile(name) else None
        token = torch.tensor([secrets.randbits(62) if rank == 0 else 0])
        if rank == 0 and buffer is not None:
            buffer[:2].view(torch.int64)[0] = token
        dist.broadcast(token, src=0)  # the others find it in the file they mapped if it is the same file
        seen = torch.tensor([int(buffer is not None and bool(buffer[:2].view(torch.int64)[0] == token))])
        shared = cls(buffer, rank, world_size, numel, timeout_s) if buffer is not None and int(seen) else None
        if shared is not None:
            shared.pids[rank], shared.starts[rank] = os.getpid(), process_start(os.getpid()) or 0
        dist.all_reduce(seen, op=dist.ReduceOp.MIN)  # also: every rank that mapped the buffer has published its PID
        if rank == 0 and name:
            os.unlink(name)  # the mappings keep it; nothing is left behind, however the job ends
        if shared is None or not int(seen):
            return None
        # Each rank decides alone (no collective more: the hang report counts them); where one cannot see the
        # others' processes it waits out the time-out as before.
        shared.watching = all(process_start(int(pid)) == int(start) for pid, start in zip(shared.pids, shared.starts))
        return shared

    def gone(self) -> list[int]:
        """The ranks this one waits for whose process has ended."""
        return [r for r in range(self.world_size) if int(self.sequence[r]) < self.last
                and process_start(int(self.pids[r])) != int(self.starts[r])]

    def average(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` (float32, at most `numel` elements) over all ranks, in place."""
        n = tensor.numel()
        self.last += 1
        slots = self.slots[self.last % 2, :, :n]
        slots[self.rank].copy_(tensor.view(-1))
        self.sequence[self.rank] = self.last
        start = time.monotonic()
        watched = 0.0
        while int(self.sequence.min()) < self.last:
            waited = time.monotonic() - start
            if waited > self.timeout_s:  # gloo's words, which dtrain's hang report recognises
                raise RuntimeError(f"Timed out waiting {self.timeout_s * 1000:.0f}ms for the other ranks in shared-"
                                   f"memory gradient all-reduce {self.last}")
            if self.watching and waited - watched > WATCH_S:
                watched = waited
                if gone := self.gone():
                    raise RuntimeError(f"rank {gone[0]} {PEER_GONE} in shared-memory gradient all-reduce {self.last}")
            # Spin briefly (the others are usually close), then sleep: with more ranks than cores a
            # spinning rank would take the core that the rank it waits for needs.
            if waited < SPIN_S:
                os.sched_yield()
            else:
                time.sleep(SLEEP_S)
        self.waited_s += time.monotonic() - start
        torch.sum(slots, dim=0, out=tensor.view(-1))
        return tensor.div_(self.world_size)


def comm_hook(state: SharedMemoryAllReduce, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """For `DistributedDataParallel.register_comm_hook` (which checks these annotations as objects, so
    this module does not postpone them): float32 buckets through shared memory, others through gloo."""
    buffer = bucket.buffer()
    if buffer.dtype != torch.float32 or buffer.numel() > state.slots.shape[-1]:
        work = dist.all_reduce(buffer.div_(state.world_size), async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(state.average(buffer))
    return future
