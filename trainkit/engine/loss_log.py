"""The per-iteration losses of the training step, kept on their device until the next flush.

:class:`SimpleTrainer` records each iteration's losses here and flushes them every ``gather_metric_period``
iterations. This is the only place where the step's losses reach the host.
"""
import math
import zlib
from typing import List, Mapping, Optional, Sequence, Tuple

import torch

from trainkit.utils import comm
from trainkit.utils.events import get_event_storage

__all__ = ["LossLog"]


class LossLog:
    """The losses of the iterations since the last flush, as detached tensors where they were computed.

    :meth:`record` keeps references and never reaches the host. :meth:`flush` reaches it once: it stacks the
    recorded losses, averages them across processes in one collective (``data_time`` takes the slowest
    process's), moves them to the host in one transfer, and puts every iteration's values into the current
    storage under the loss names, ``total_loss`` and ``data_time``. A non-finite total loss raises
    ``FloatingPointError`` naming the first such iteration; the iterations before it still reach the storage.

    One representation on every device, CPU included: reading a CPU loss at once would cost about as much as
    keeping it, and a second representation costs the reader more (``benchmarks/README.md`` has the figures).
    """

    def __init__(self) -> None:
        self._keys: Tuple[str, ...] = ()  # the loss names of the recorded iterations, in the model's order
        self._iters: List[int] = []
        self._losses: List[torch.Tensor] = []  # row after row: each iteration's losses, then its total
        self._data_time: List[float] = []
        self._next_keys: Optional[Tuple[str, ...]] = None  # named in the error when ranks change names apart

    def record(
        self, iteration: int, loss_dict: Mapping[str, torch.Tensor], total: torch.Tensor, data_time: float
    ) -> None:
        """Keeps one iteration's losses (and their sum ``total``) and its data-loading time."""
        keys = tuple(loss_dict)
        if keys != self._keys:
            self._change_names(keys)
        self._losses.extend(map(torch.Tensor.detach, loss_dict.values()))
        if len(keys) > 1:
            self._losses.append(total.detach())
        self._iters.append(iteration)
        self._data_time.append(data_time)

    def _change_names(self, keys: Tuple[str, ...]) -> None:
        # The model returned other losses than before (or it is the first record): flush the old ones first.
        self._next_keys = keys
        try:
            self.flush()
        finally:
            self._next_keys = None
        if len(keys) > 1 and "total_loss" in keys:
            raise ValueError(
                f"The model returned a loss named 'total_loss' besides other losses ({list(keys)}); trainkit "
                "records their sum under that name. Rename that loss."
            )
        self._keys = keys

    @property
    def _names(self) -> Tuple[str, ...]:
        return self._keys if len(self._keys) == 1 else self._keys + ("total_loss",)

    def flush(self, reduce: bool = True) -> None:
        """Puts the recorded iterations into the storage now (see the class docstring).

        Args:
            reduce: average across processes. With several processes this is then a collective that every
                process must call at the same iteration. The trainer passes False only when training failed
                and the other processes may not be there to meet.
        """
        if not self._iters:
            return
        names, iters, data_time = self._names, self._iters, self._data_time
        values = self._stack()
        self._iters, self._losses, self._data_time = [], [], []
        if reduce and comm.get_world_size() > 1:
            values, data_time = self._average_across_processes(values, names, iters, data_time)
        rows = values.view(len(iters), len(names)).tolist()  # the one transfer to the host
        self._put(names, iters, rows, data_time)

    def _stack(self) -> torch.Tensor:
        try:
            values = torch.stack(self._losses)  # promotes mixed float dtypes
        except RuntimeError:  # losses on several devices, or one-element losses of shapes () and (1,) mixed
            first = self._losses[0]
            values = torch.stack([t.to(first.device, torch.float32).reshape(()) for t in self._losses])
        return values.view(-1)  # losses of shape (1,) stack to (n, 1)

    def _average_across_processes(
        self, values: torch.Tensor, names: Tuple[str, ...], iters: List[int], data_time: List[float]
    ) -> Tuple[torch.Tensor, List[float]]:
        self._check_ranks_agree(names, iters)
        host_time = torch.tensor(data_time, dtype=torch.float32, device=values.device).view(-1, 1)
        mine = torch.cat([values.float().view(len(iters), -1), host_time], dim=1)
        gathered = [torch.empty_like(mine) for _ in range(comm.get_world_size())]
        torch.distributed.all_gather(gathered, mine)
        stacked = torch.stack(gathered)
        data_time = stacked[:, :, -1].amax(dim=0).tolist()
        return stacked[:, :, :-1].mean(dim=0), data_time

    def _check_ranks_agree(self, names: Tuple[str, ...], iters: List[int]) -> None:
        # The all_gather needs the same shape on every rank; otherwise gloo aborts the process and NCCL hangs.
        # Compare first (count of iterations, the names in order), in one small CPU collective.
        layout = [len(iters), zlib.crc32("\0".join(names).encode())]
        if all(other == layout for other in comm.all_gather_ints(layout)):
            return
        ranks = comm.all_gather((list(names), iters[0], iters[-1], self._next_keys))
        described = "; ".join(
            f"rank {r}: {n} for iterations {first}..{last}" + (f", then {list(nxt)} from {last + 1}" if nxt else "")
            for r, (n, first, last, nxt) in enumerate(ranks)
        )
        raise RuntimeError(
            f"The processes disagree on the losses to average: {described}. Every process's model must return "
            "the same loss names, in the same order, at every iteration (return a zero loss for one that does not "
            "apply), and flush_metrics() must be called on every process at the same iteration."
        )

    @staticmethod
    def _put(names: Sequence[str], iters: List[int], rows: List[List[float]], data_time: List[float]) -> None:
        total = names.index("total_loss") if "total_loss" in names else 0
        good = next((i for i, row in enumerate(rows) if not math.isfinite(row[total])), len(rows))
        storage = get_event_storage()
        if good:  # what came before a bad iteration still reaches the storage
            columns = list(zip(*rows[:good]))
            for name, column in zip(names, columns):
                storage.put_scalar_series(name, column, iters[:good])
            if "total_loss" not in names:
                storage.put_scalar_series("total_loss", columns[0], iters[:good])
            storage.put_scalar_series("data_time", data_time[:good], iters[:good])
        if good < len(rows):
            raise FloatingPointError(
                f"Loss became infinite or NaN at iteration={iters[good]}!\n"
                f"loss_dict = {dict(zip(names, rows[good]))}\n"
                "Checkpoints written before this iteration are untouched."
            )
