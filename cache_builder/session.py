"""What every rank of a build or growth holds while it changes a store (kept apart from ``cache_builder.store``,
which ``cit cache merge`` / ``export`` use without torch)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from shared.reader import distributed_context
from shared.store_lock import StoreLock


class StoreSession:
    """One change of a store by every rank: the process group, the store's lease (rank 0 takes it) and the
    caller's thread count (a build pins its own), all given back on exit, whatever happened."""

    def __init__(self):
        self.comm = _Dist()
        self.lock: StoreLock | None = None
        self._caller_threads = torch.get_num_threads()

    def __enter__(self) -> "StoreSession":
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()
        torch.set_num_threads(self._caller_threads)
        self.comm.close()


class _Dist:
    """Collectives over a gloo group (works for CPU tensors whatever backend the caller initialised)."""

    def __init__(self):
        self.rank, self.world = distributed_context()
        self.owned = False
        self.group = None
        if self.world > 1:
            if not dist.is_initialized():
                dist.init_process_group("gloo")
                self.owned = True
            elif dist.get_backend() != "gloo":
                self.group = dist.new_group(backend="gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def sum(self, value: int) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, group=self.group)
        return int(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
