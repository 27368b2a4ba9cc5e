"""Distributed PTQ: the calibration batches split over processes, the statistics summed in the one-process order,
the independent solves spread over the processes.

Every process holds the whole model and a contiguous share of the calibration batches (process r of W takes
batches [r B / W, (r + 1) B / W)). Block by block, each runs the block's passes on its batches only; the
statistics are then combined so that every process holds exactly what one process would have (`Ranks.reduce`):

* Sums over tokens (Gram matrices: GPTQ's Hessian, AWQ's error; sum |x|: AWQ's activation magnitudes; per linear
  or per expert) are made in one process batch by batch, G = ((G_0 + G_1) + G_2) + ..., each batch's G_b
  accumulated on its own (`InputStats(per_batch=True)`). Process r keeps its G_b apart, receives the running sums
  of batches 0..k-1 from process r - 1 (all the statistics of a step in one buffer), adds its own in order and
  passes them on; the last process broadcasts the totals. These are the same float additions in the same order as
  in one process (an all-reduce would add the processes' partial sums in an order of its own: the sums would
  differ in the last bits, and so, through GPTQ's rounding or a search's argmin, would some weights). Token counts
  (integers) and max |x| are all-reduced: exact in any order.
* Independent solves (`Ranks.spread`: GPTQ's linears of a stage and its experts, AWQ's scale and clipping
  searches) go to different processes, largest first to the least loaded; every result (weights, scales,
  qparams) is gathered by every process and set on its model in the one-process order, so every process ends
  with the same quantized model. The algorithms call `combine` and `spread`, which do the same work in one process
  (`ranks` None): one code path.
* Each process runs its batches through the solved block: the next block's inputs stay sharded.

On GPUs (backend nccl, `launch` / `init_from_env`) process r computes on cuda:<local rank> (`rank_device`): the
statistics stay there, the solves' results travel through the CPU (`_to`), so each lands on its receiver's device.

Communication per step: the statistics passed along the chain of processes and broadcast, and the results
gathered. Memory: a process keeps the sums of its own batches until they are combined (B / W per statistic), on
top of one process's.

The same quantized weights as one process (atol=0), provided each batch's forward gives the same bits in every
process: the same batches (the same sizes), kernels and thread count.

    qat.ptq.distributed.launch(my_rank_function, 2, *args)   # this process is rank 0; 1 spawned (gloo)
    qat.ptq.distributed.launch(my_rank_function, 2, *args, backend="nccl")   # process r on cuda:r
    qat.ptq.apply(model, "gptq", batches, distributed=True)   # in every process of an initialised group
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from qat.errors import ConfigError
from qat.ptq.stats import InputStats


@dataclass
class Ranks:
    """This process's place in the PTQ process group: its rank, the world size, and the solve load so far."""

    rank: int
    world: int
    load: list[int] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live

    def __post_init__(self) -> None:
        self.load = self.load or [0] * self.world

    @classmethod
    def current(cls) -> "Ranks":
        """The default process group's rank and size.

        Raises:
            ConfigError: no process group is initialised (see `launch`, or run under torchrun).
        """
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("distributed PTQ needs an initialised torch.distributed process group: run it through "
                              "qat.ptq.distributed.launch (qat-ptq distributed.processes=N) or under torchrun")
        return cls(dist.get_rank(), dist.get_world_size(), device=rank_device())

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This process's contiguous share of `items` (shares differ in length by at most one, the first longer).

        Raises:
            ConfigError: fewer items than processes.
        """
        n = len(items)
        if n < self.world:
            raise ConfigError(f"distributed PTQ over {self.world} processes needs at least {self.world} calibration "
                              f"batches, got {n}; give more calibration.samples or fewer distributed.processes")
        start = self.rank * (n // self.world) + min(self.rank, n % self.world)
        return list(items[start:start + n // self.world + (self.rank < n % self.world)])

    def reduce(self, stats: InputStats | Sequence[InputStats]) -> None:
        """Combine the statistics of every process's batches into `stats` (one or several), as one process would.

        Each kept its batches' sums apart (`InputStats.keep_batches`). The Gram matrices and sums |x| of all of
        them travel in one buffer along the chain of processes, each adding its batches in batch order; token
        counts are summed and max |x| maxed by all-reduce (exact in any order). Afterwards every process holds
        the same totals, bit for bit, as one process running all the batches. Every process must pass the same
        statistics in the same order."""
        many = [stats] if isinstance(stats, InputStats) else list(stats)
        if not many:
            return
        kept = [st.pop_batches() for st in many]
        counts = torch.tensor([st.n_tokens for st in many], dtype=torch.long, device=self.device)
        dist.all_reduce(counts)
        maxima = [st.abs_max for st in many if st.magnitudes]
        top = torch.cat(maxima) if maxima else None
        if top is not None:
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
        parts = [st.partial_sums() for st in many]
        flat = (torch.cat([p.reshape(-1) for ps in parts for p in ps]) if any(parts)
                else torch.zeros(0, device=self.device))
        if self.rank > 0:
            dist.recv(flat, self.rank - 1)
        views, at = [], 0
        for ps in parts:
            views.append([])
            for p in ps:
                views[-1].append(flat[at:at + p.numel()].view(p.shape))
                at += p.numel()
        for totals, batches in zip(views, kept):
            for sums in batches:
                for total, part in zip(totals, sums):
                    total.add_(part)
        if self.rank + 1 < self.world:
            dist.send(flat, self.rank + 1)
        dist.broadcast(flat, self.world - 1)
        at = 0
        for st, totals, count in zip(many, views, counts.tolist()):
            width = st.in_features if st.magnitudes else 0
            st.set_sums(totals, count, None if top is None else top[at:at + width].clone())
            at += width

    def calibrate_in_turn(self, held: Sequence[Any], run: Callable[[], Any]) -> None:
        """Static activation / KV ranges (`held`: the block's TensorQuantizers, the same in every process, in the same
        order) calibrated over every process's batches as one process calibrates them over all: `run()` (a pass of
        the block over this process's batches, observing) goes process after process, each starting from the ranges
        its predecessor ended with, and the last one's are every process's. One pass calibrates all the block's
        quantizers at once, so a later linear's inputs go through its predecessors' running ranges: merging ranges
        calibrated apart (min / max) would differ from one process in the last bits; this order does not. Exact for
        minmax (a quantizer's whole state is its observer's lo / hi; `mergeable_range_errors` refuses the others).
        All ranks must call it alike."""
        if self.rank > 0:
            received: list[Any] = [None]
            dist.recv_object_list(received, self.rank - 1)
            _set_ranges(held, received[0])
        run()
        ranges = [[_to(self.device, (q.observer.lo, q.observer.hi), "cpu") if q.initialized else None for q in held]]
        if self.rank + 1 < self.world:
            dist.send_object_list(ranges, self.rank + 1)
        dist.broadcast_object_list(ranges, self.world - 1)
        _set_ranges(held, ranges[0])

    def spread(self, costs: Sequence[int], solve: Callable[[int], Any]) -> list[Any]:
        """`solve(i)` for every task i (`costs[i]`: its work), each run by the rank `owners` gives it; every rank
        receives every result (pickled: tensors exactly), in task order. All ranks must call it alike."""
        owners = self.owners(costs)
        mine = {i: _to(self.device, solve(i), "cpu") for i, r in enumerate(owners) if r == self.rank}
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, mine)
        results = {i: res for part in gathered for i, res in part.items()}
        return [_to(self.device, results[i], self.device) for i in range(len(costs))]

    def owners(self, sizes: Sequence[int]) -> list[int]:
        """The rank that solves each task of a step (a stage's linears, experts, searches; `sizes`: their work,
        e.g. weight numel): largest first, each to the rank with the least work in this step (ties: the least work
        so far, then the lowest rank)."""
        stage = [0] * self.world
        out = [0] * len(sizes)
        for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
            r = min(range(self.world), key=lambda r: (stage[r], self.load[r], r))
            out[i] = r
            stage[r] += sizes[i]
            self.load[r] += sizes[i]
        return out


def _to(where: torch.device, obj: Any, device: torch.device | str) -> Any:
    """`obj` (tensors, in tuples, lists, dicts and dataclasses) with its tensors on `device`, when the ranks compute
    on a GPU (`where`): a pickled CUDA tensor would be unpickled on the sender's GPU. On the CPU: `obj` itself."""
    if where.type == "cpu":
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple: built from its fields, not an iterable
        return type(obj)(*(_to(where, o, device) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(where, o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(where, v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _to(where, getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _set_ranges(held: Sequence[Any], ranges: Sequence[Any]) -> None:
    for q, r in zip(held, ranges):
        if r is not None:
            q.observer.lo, q.observer.hi = (t.to(q.observer.lo.device) for t in r)
            q.initialized = True


def mergeable_range_errors(schemes: Sequence[tuple[str, Any]]) -> list[str]:
    """What in (name, QuantSpec) activation / KV schemes distributed PTQ cannot calibrate as one process does
    (`Ranks.calibrate_in_turn`): minmax ranges, whose whole state is the observer's running min / max, are; other
    observers (percentile, moving_average, mse) and learned ranges (PACT / LSQ, set from the first batch) are not
    (refused)."""
    bad = sorted({name for name, spec in schemes
                  if spec is not None and not spec.dynamic and (spec.observer != "minmax" or spec.learn != "none")})
    if not bad:
        return []
    more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
    return [f"static activation ranges of {', '.join(bad[:3])}{more} are not minmax-observed (or are learned): "
            "merged across processes they would differ from one process's; use observer: minmax with learn: none, "
            "dynamic activation quantization, or distributed.processes=1"]


def combine(ranks: Ranks | None, stats: InputStats | Sequence[InputStats]) -> None:
    """`ranks.reduce(stats)` over a process group; nothing to do in one process (`ranks` None)."""
    if ranks is not None:
        ranks.reduce(stats)


def spread(ranks: Ranks | None, costs: Sequence[int], solve: Callable[[int], Any]) -> list[Any]:
    """[solve(i) for each task i]: in one process (`ranks` None) all here, in order; over a process group each on
    one rank and every result on every rank (`Ranks.spread`). The solves must be independent of each other.

    Example:
        >>> scales = spread(self.ranks, [w.numel() for w in weights], lambda i: search(weights[i]))
    """
    if ranks is None:
        return [solve(i) for i in range(len(costs))]
    return ranks.spread(costs, solve)


def process_rank() -> int:
    """This process's rank in the initialised default process group; 0 without one."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init_from_env(backend: str = "gloo") -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment), unless one exists; with
    backend="nccl" this process computes on cuda:LOCAL_RANK (`rank_device`).

    Returns:
        whether this process is one of several (a group is initialised).
    Raises:
        ConfigError: a group of several processes exists with another backend than `backend`: its ranks would
            compute where that backend puts them (gloo: the CPU), not on the device asked for.
    """
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1 and dist.get_backend() != backend:
            where = {"nccl": "cuda (device=cuda or auto)", "gloo": "the CPU (device=cpu)"}
            raise ConfigError(f"a process group with backend {dist.get_backend()} already exists in this process; its "
                              f"ranks compute on {where.get(dist.get_backend(), 'its devices')}, not on "
                              f"{where.get(backend, backend)}: choose the device that matches it, or start the "
                              f"group with backend {backend}")
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=TIMEOUT)
    return True


def backend_for(device: torch.device) -> str:
    """The process group backend for ranks computing on `device`'s type: nccl for CUDA, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device() -> torch.device:
    """The device this rank computes on: its current CUDA device in an nccl group (set by `launch` /
    `init_from_env`: cuda:<local rank>), else the CPU (gloo, or no group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def free_port() -> int:
    """A TCP port free on this host now, for the process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TIMEOUT = datetime.timedelta(minutes=60)  # a collective waits this long for a slower rank (a large solve)


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one, else os.cpu_count()).

    Example:
        >>> usable_cpus()  # 2 on a 2-core host, or under `taskset -c 0,1`
        2
    """
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows: no affinity mask
        return os.cpu_count() or 1


def init_group(rank: int, world: int, port: int, backend: str = "gloo") -> None:
    """Join the process group of `world` processes on this host (rendezvous on 127.0.0.1:`port`); with
    backend="nccl" process `rank` computes on cuda:`rank`."""
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=TIMEOUT)


def _spawned(index: int, fn: Callable, world: int, port: int, backend: str, args: tuple) -> None:
    init_group(index + 1, world, port, backend)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, processes: int, *args: Any, backend: str = "gloo") -> Any:
    """Run `fn(*args)` in `processes` processes joined in one process group; this process is rank 0.

    The other ranks are spawned (fresh interpreters: `fn` must be importable, `args` picklable) and run the same
    call; they must make the same collective calls (e.g. `qat.ptq.apply(..., distributed=True)`). With
    backend="nccl" process r computes on cuda:r (`rank_device`); gloo: the CPU.
    Returns:
        what `fn` returned in this process.
    Raises:
        ConfigError: processes < 1.
        whatever `fn` raised here; a spawned rank's failure as torch.multiprocessing's ProcessRaisedException.
    Example:
        >>> launch(quantize_rank, 2, model_cfg, batches)
    """
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise ConfigError(f"distributed.processes={processes!r}; must be a positive integer (1: no distribution)")
    if processes == 1:
        return fn(*args)
    port = free_port()
    ctx = torch.multiprocessing.start_processes(_spawned, (fn, processes, port, backend, args), nprocs=processes - 1,
                                                join=False, start_method="spawn")
    finished, failure = threading.Event(), []
    watcher = threading.Thread(target=_watch, args=(ctx, finished, failure), daemon=True)
    watcher.start()
    init_group(0, processes, port, backend)
    try:
        result = fn(*args)
    except BaseException as exc:
        finished.set()
        # a collective usually fails here because another rank died: say why it did. The watcher learns of the
        # death only once that process has exited and its error is read (over 5 s on a loaded machine: a dying
        # torch process closes its sockets well before it exits), so wait longer when gloo says a peer went away
        # or a spawned process is gone; otherwise the others are waiting on this rank's collective: stop soon
        peer_gone = isinstance(exc, RuntimeError) and "by peer" in str(exc)
        watcher.join(timeout=60.0 if peer_gone or any(not p.is_alive() for p in ctx.processes) else 5.0)
        for p in ctx.processes:  # they would wait for this rank's collectives until the timeout
            p.terminate()
        if failure and not isinstance(exc, ConfigError):  # a ConfigError here is the ranks' shared refusal
            raise failure[0] from exc
        raise
    finally:
        finished.set()
        dist.destroy_process_group()
    watcher.join()
    if failure:
        raise failure[0]
    return result


def _watch(ctx: Any, finished: threading.Event, failure: list) -> None:
    """Join the spawned ranks; when one fails while this rank still works, stop this process.

    This rank would otherwise sit in a collective until TIMEOUT (an hour) waiting for the dead rank; a blocked
    collective cannot be interrupted from Python, so the process exits (status 1) after saying which rank failed
    (its traceback is already on stderr). Files are written by temporary file and rename: none is left half-written.
    """
    try:
        while not ctx.join(timeout=1.0):
            pass
    except Exception as e:  # ProcessRaisedException / ProcessExitedException; join terminated the others
        failure.append(e)
        # every rank makes the same checks: give this one a minute to refuse on its own (a clean message)
        if not finished.wait(timeout=60.0):
            print(f"qat: a distributed PTQ process failed, stopping all of them: {e}", file=sys.stderr, flush=True)
            os._exit(1)
