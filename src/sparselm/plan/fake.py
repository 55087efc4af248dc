"""One rank of an N-rank job in this process, without the job's memory: a fake process group and fake tensors.

``fake_world(n)`` makes this process rank 0 of ``n`` on torch.distributed's ``fake`` backend: every collective
returns at once and moves nothing, so DeviceMesh, DTensor and FSDP2 build exactly the groups and sharded tensors a
real rank builds. Under ``FakeTensorMode`` those tensors have shapes, dtypes and storages but no memory, so a
1.2T-parameter model and its optimizer state cost nothing here.

A training step needs a few *values*, not only shapes: the position check, the MoE router's per-expert counts that
size the expert-parallel all-to-all and the expert loop, the losses the trainer prints. ``DryRun`` is the dispatch
mode the step runs under, above ``FakeTensorMode``. It keeps a real CPU copy (a "value") of every small integer or
tiny tensor whose inputs all have values, and computes those ops for real on the copies, so data-dependent shapes
come out exactly as a real rank would see them. Where a value cannot be known it assumes:

- a top-k over unknown scores (the router) picks k distinct candidates round-robin: perfectly balanced routing;
- an all-to-all of known values (the expert counts) receives what it sends: every rank receives as many rows as it
  sends, the mean over ranks of a real run;
- an unknown floating-point scalar (a loss, a gradient norm) is 0.0; an unknown integer is an error, never a guess.

``DryRun`` is a ``Tally``, which also runs on real tensors (tests compare the two): it counts the bytes of every
storage alive (exact at every op, FSDP's storage resizes included) and their peak, and the FLOPs of every matmul and
attention (torch's own formulas).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.distributed.tensor._sharding_prop import ShardingPropagator
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count
from torch.utils.weak import WeakIdKeyDictionary

from sparselm.errors import InputError
from sparselm.parallel.launch import DistEnv

aten = torch.ops.aten
_DEVICE = torch.ops.prim.device.default
# Values are kept for integer/bool tensors up to this many elements (routing bookkeeping, positions, masks) and for
# floating-point ones up to FLOAT_VALUE_LIMIT (scalars); anything larger is shapes only.
INT_VALUE_LIMIT = 1 << 24
FLOAT_VALUE_LIMIT = 4096
_PLAIN = (torch.Tensor, FakeTensor, torch.nn.Parameter)


class PlanError(RuntimeError):
    """The dry run met something it cannot run without real data (a bug in the plan, not in the user's input)."""


@contextmanager
def fake_world(world_size: int) -> Iterator[DistEnv]:
    """This process as rank 0 of ``world_size`` on the fake backend (left again on exit)."""
    if dist.is_initialized():
        raise InputError("a process group is already initialised: run sparselm plan in a process of its own")
    dist.init_process_group("fake", rank=0, world_size=world_size)
    try:
        yield DistEnv(0, 0, world_size, torch.device("cpu"), "fake", owns_group=False)
    finally:
        dist.destroy_process_group()


def _has_value_room(t: torch.Tensor) -> bool:
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return t.numel() <= FLOAT_VALUE_LIMIT
    return t.numel() <= INT_VALUE_LIMIT


_WRITES: dict = {}  # op -> the (position, name) of every argument it writes into
_ALIASES: dict = {}  # op -> whether an output aliases an input


def _tensors(x) -> list[torch.Tensor]:
    """The tensors in an op's output (a tensor, or tuples / lists of them): pytree's generality costs too much here."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    return []


def _written_args(func, args, kwargs) -> list[torch.Tensor]:
    """Tensors an op writes into (in-place ops, ``out=``, collectives' outputs)."""
    writes = _WRITES.get(func)
    if writes is None:
        arguments = func._schema.arguments
        writes = _WRITES[func] = tuple(
            (i, a.name) for i, a in enumerate(arguments) if a.alias_info is not None and a.alias_info.is_write
        )
    written = []
    for i, name in writes:
        value = args[i] if i < len(args) else kwargs.get(name)
        written += [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    return written


def _sdpa_cpu_flops(args, out) -> int:
    q, k, v = args[0], args[1], args[2]
    return sdpa_flop_count(q.shape, k.shape, v.shape)


def _sdpa_cpu_backward_flops(args, out) -> int:
    grad_out, q, k, v = args[0], args[1], args[2], args[3]
    return sdpa_backward_flop_count(grad_out.shape, q.shape, k.shape, v.shape)


def _grouped_mm_flops(args, out) -> int:
    a, b = args[0], args[1]
    if a.dim() == 2 and b.dim() == 2:  # groups along the contracted dim (the expert weight gradients)
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    return 2 * out.numel() * a.shape[-1]  # each output row (or group) against its own matrix


# Not in torch's FLOP registry: the CPU attention kernel (it does what flash attention does) and grouped_mm (the
# MoE experts on accelerators).
_EXTRA_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: _sdpa_cpu_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: _sdpa_cpu_backward_flops,
    aten._grouped_mm.default: _grouped_mm_flops,
}


class _Propagating:
    """Stands in for ShardingPropagator's lock while a tally is active: marks DTensor's shape propagation."""

    def __init__(self, tally: Tally, inner) -> None:
        self.tally, self.inner = tally, inner

    def __enter__(self):
        self.inner.__enter__()
        self.tally._propagating += 1

    def __exit__(self, *exc):
        self.tally._propagating -= 1
        return self.inner.__exit__(*exc)


class Tally(TorchDispatchMode):
    """What this rank holds and does, on real tensors as on fake ones: the bytes of every storage alive (each
    storage once, from the op that made it until it dies, FSDP's resizes included) and their peak, and the FLOPs of
    every matmul and attention (torch's own formulas)."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, list] = {}  # storage id -> [weakref, bytes, creation number]
        self._serial = itertools.count()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.flops = 0
        self._resize = None
        self._lock = None
        self._propagating = 0

    def __enter__(self):
        original = torch.UntypedStorage.resize_
        self._resize = original
        tally = self

        def resize_(storage, size):
            # FSDP frees and re-allocates its gathered parameters by resizing storages, which no dispatch mode sees.
            result = original(storage, size)
            tally._resized(storage)
            return result

        torch.UntypedStorage.resize_ = resize_
        # DTensor derives output shapes by running each new op once on fake tensors of the *global* shapes, inside
        # ShardingPropagator._fake_mode_lock (a replaceable context manager): none of that is this rank's memory or
        # work, so it is not counted.
        self._lock = ShardingPropagator._fake_mode_lock
        ShardingPropagator._fake_mode_lock = _Propagating(self, self._lock)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        ShardingPropagator._fake_mode_lock = self._lock
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _DEVICE:
            return func(*args, **kwargs)  # half of all calls: C++ asking a fake tensor for its device
        if any(t not in _PLAIN for t in types):
            return NotImplemented  # DTensor first unwraps into local ops, which come back here
        if self._propagating:
            return func(*args, **kwargs)  # DTensor's sharding propagation (see __enter__)
        out = self._run(func, args, kwargs)
        if func is not aten._local_scalar_dense.default:
            self._count(func, args, kwargs, out)
        return out

    def _run(self, func, args, kwargs):
        return func(*args, **kwargs)

    def _count(self, func, args, kwargs, out) -> None:
        # Storages are counted from the op that creates them; an op whose outputs alias its inputs (views, in-place
        # ops, collectives) creates none. A view of a storage never seen made (a collective backend's own buffer:
        # gloo keeps a full-size copy for its reduce-scatter, NCCL does not) is not the job's memory.
        aliases = _ALIASES.get(func)
        if aliases is None:
            aliases = _ALIASES[func] = any(r.alias_info is not None for r in func._schema.returns)
        if not aliases:
            for t in _tensors(out):
                if not t.is_meta:
                    self._track(t.untyped_storage())
        packet = func.overloadpacket
        if packet in flop_registry:
            self.flops += flop_registry[packet](*args, **kwargs, out_val=out)
        elif func in _EXTRA_FLOPS:
            self.flops += _EXTRA_FLOPS[func](args, out)

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self.storages:
            return
        size = storage.nbytes()
        ref = weakref.ref(storage, lambda _, key=key: self._release(key))
        self.storages[key] = [ref, size, next(self._serial)]
        self._add(size)

    def _release(self, key: int) -> None:
        entry = self.storages.pop(key, None)
        if entry is not None:
            self.live_bytes -= entry[1]

    def _resized(self, storage: torch.UntypedStorage) -> None:
        entry = self.storages.get(storage._cdata)
        if entry is not None:
            size = storage.nbytes()
            self.live_bytes -= entry[1]
            entry[1] = size
            self._add(size)

    def _add(self, size: int) -> None:
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def mark(self) -> int:
        """A point in time: ``bytes_since(mark)`` counts the live storages created after it."""
        return next(self._serial)

    def bytes_since(self, mark: int, exclude: set[int] = frozenset()) -> int:
        return sum(size for key, (_, size, serial) in self.storages.items() if serial > mark and key not in exclude)

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes


class DryRun(Tally):
    """A tally on fake tensors that also keeps values where they can be known (see the module docstring). Enter it
    inside the ``FakeTensorMode`` given (``with fake_mode, DryRun(fake_mode): ...``)."""

    def __init__(self, fake_mode: FakeTensorMode) -> None:
        super().__init__()
        self.fake_mode = fake_mode
        self.values: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.unknown_scalars = 0

    def _run(self, func, args, kwargs):
        tensors = _tensors(args) + _tensors(list(kwargs.values()))
        fakes = [t for t in tensors if isinstance(t, FakeTensor)]
        if tensors and not fakes and not any(t.is_meta for t in tensors):
            # Real tensors only: device-mesh bookkeeping, Python numbers turned into tensors. Cheap, and real.
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if all(t in self.values for t in fakes):
            flat, spec = tree_flatten((args, kwargs))
            return self._known(func, flat, spec, args, kwargs)
        return self._unknown(func, args, kwargs)

    def value(self, t: torch.Tensor) -> torch.Tensor | None:
        """The real value of fake tensor ``t`` if the dry run knows it."""
        return self.values.get(t)

    # ---- values --------------------------------------------------------------------------------------------------
    def _real(self, func, flat, spec):
        args, kwargs = tree_unflatten([self.values[a] if isinstance(a, FakeTensor) else a for a in flat], spec)
        with unset_fake_temporarily():
            return func(*args, **kwargs)

    def _known(self, func, flat, spec, args, kwargs):
        if func is aten._local_scalar_dense.default:
            return self._real(func, flat, spec)
        try:
            out = func(*args, **kwargs)
        except (DynamicOutputShapeException, DataDependentOutputException):
            out = None  # a data-dependent shape: the real op below says what it is
        if out is not None:
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            if not all(_has_value_room(t) for t in outs):
                self._forget(_written_args(func, args, kwargs))
                return out
        real = self._real(func, flat, spec)
        if func is torch.ops.c10d.alltoall_base_.default:
            # The fake group moved nothing: every rank receives what it sends (balanced routing, see above).
            out_value, in_value = self.values[args[0]], self.values[args[1]]
            if out_value.shape == in_value.shape:
                out_value.copy_(in_value)
        elif getattr(func, "namespace", "") in ("c10d", "_c10d_functional"):
            self._forget(_written_args(func, args, kwargs))
            return out if out is not None else real
        if out is None:
            with self.fake_mode:
                out = tree_map(
                    lambda r: torch.empty_strided(r.shape, r.stride(), dtype=r.dtype) if torch.is_tensor(r) else r,
                    real,
                )
        for fake, value in zip(tree_flatten(out)[0], tree_flatten(real)[0], strict=False):
            if isinstance(fake, FakeTensor) and torch.is_tensor(value):
                self.values[fake] = value
        return out

    def _unknown(self, func, args, kwargs):
        if func is aten._local_scalar_dense.default:
            t = args[0]
            if t.dtype.is_floating_point:
                self.unknown_scalars += 1
                return 0.0
            raise PlanError(f"the dry run needs the value of a {t.dtype} tensor of shape {tuple(t.shape)}")
        try:
            out = func(*args, **kwargs)
        except (DynamicOutputShapeException, DataDependentOutputException) as e:
            raise PlanError(f"{func} has a data-dependent shape and its inputs are not known in a dry run") from e
        self._forget(_written_args(func, args, kwargs))
        if func is aten.topk.default and args[0].dim() == 2 and (len(args) < 3 or args[2] in (-1, 1)):
            rows, candidates = args[0].shape
            k = args[1]
            with unset_fake_temporarily():
                chosen = (torch.arange(rows).unsqueeze(1) * k + torch.arange(k)) % candidates
            self.values[out[1]] = chosen
        return out

    def _forget(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            self.values.pop(t, None)
            base = t._base
            if base is not None:
                self.values.pop(base, None)
