"""torch.distributed hook: each collective call as a child experiment span.

`install()` (or `with collective_spans():`) wraps the collective functions of
torch.distributed; each call becomes a span named "c10d.<op>" whose metadata carries the
tensor's dtype (as model_name), the enclosing span's step, and the metrics c10d.numel,
c10d.bytes, c10d.seq (per process group, from 1), c10d.group, c10d.group_size and c10d.async.
See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import functools
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from renacerd.client import current_span, experiment_span

SPAN_PREFIX = "c10d."
# op -> index of the argument holding the tensor(s) this rank contributes (None: no tensor)
COLLECTIVES: dict[str, int | None] = {
    "all_reduce": 0, "broadcast": 0, "reduce": 0, "all_gather": 1,
    "all_gather_into_tensor": 1, "reduce_scatter": 1, "reduce_scatter_tensor": 1,
    "all_to_all": 1, "all_to_all_single": 1, "gather": 0, "scatter": 0, "barrier": None,
    "monitored_barrier": None, "send": 0, "recv": 0, "isend": 0, "irecv": 0,
    "all_gather_object": None, "broadcast_object_list": None,
}
# the keyword name of that argument, when it is passed by keyword
_ARG_NAMES = {"all_reduce": "tensor", "broadcast": "tensor", "reduce": "tensor",
              "all_gather": "tensor", "all_gather_into_tensor": "input_tensor",
              "reduce_scatter": "input_list", "reduce_scatter_tensor": "input",
              "all_to_all": "input_tensor_list", "all_to_all_single": "input",
              "gather": "tensor", "scatter": "tensor", "send": "tensor", "recv": "tensor",
              "isend": "tensor", "irecv": "tensor"}

# op -> position of its `group` argument when passed positionally
_GROUP_AT = {"all_reduce": 2, "broadcast": 2, "reduce": 3, "all_gather": 2,
             "all_gather_into_tensor": 2, "reduce_scatter": 3, "reduce_scatter_tensor": 3,
             "all_to_all": 2, "all_to_all_single": 4, "gather": 3, "scatter": 3, "barrier": 0,
             "monitored_barrier": 0, "send": 2, "recv": 2, "isend": 2, "irecv": 2,
             "all_gather_object": 2, "broadcast_object_list": 2}

_originals: dict[str, Callable[..., Any]] = {}
_seq: dict[str, int] = {}


_dtype_names: dict[Any, str] = {}
# group object (None: the default group) -> (name, its number, size); never changing while
# the group lives (destroy_process_group clears it)
_groups: dict[Any, tuple[str, float, int]] = {}


def _dtype_name(dtype: Any) -> str:
    name = _dtype_names.get(dtype)
    if name is None:
        name = _dtype_names[dtype] = str(dtype).removeprefix("torch.")
    return name


def _tensors(value: Any) -> tuple[int, int, str]:
    """(elements, bytes, dtype name) of a tensor or a list of tensors."""
    if isinstance(value, torch.Tensor):
        n = value.numel()
        return n, n * value.element_size(), _dtype_name(value.dtype)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        n = sum(t.numel() for t in value)
        return n, sum(t.numel() * t.element_size() for t in value), _dtype_name(value[0].dtype)
    return 0, 0, ""


def _group(group: Any) -> tuple[str, float, int]:
    """The process group's name (the same on every rank), that as a number, and its size."""
    known = _groups.get(group)
    if known is not None:
        return known
    try:
        pg = group if group is not None else c10d._get_default_group()
        name = pg.group_name
        known = (name, _group_number(name), pg.size())
    except (RuntimeError, ValueError, AttributeError):
        return "", -1.0, 0  # no group yet: the call itself will say why
    _groups[group] = known
    return known


def _group_number(name: str) -> float:
    """A group's name as a number for the span's metrics (a crc32 when not numeric)."""
    return float(int(name)) if name.isdigit() else float(zlib.crc32(name.encode()))


def _wrap(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    where = COLLECTIVES[op]
    key = _ARG_NAMES.get(op)
    gat = _GROUP_AT[op]

    @functools.wraps(fn)
    def collective(*args: Any, **kwargs: Any) -> Any:
        parent = current_span()
        if parent is not None and parent.name.startswith(SPAN_PREFIX):
            return fn(*args, **kwargs)  # a collective built on another (all_gather_object)
        arg = kwargs.get(key) if key in kwargs else (
            args[where] if where is not None and len(args) > where else None)
        numel, nbytes, dtype = _tensors(arg)
        group = kwargs.get("group")
        if group is None and len(args) > gat:
            group = args[gat]
        gname, gnum, gsize = _group(group)
        seq = _seq[gname] = _seq.get(gname, 0) + 1
        metrics = {"c10d.numel": float(numel), "c10d.bytes": float(nbytes),
                   "c10d.seq": float(seq), "c10d.group": gnum,
                   "c10d.group_size": float(gsize),
                   "c10d.async": 1.0 if kwargs.get("async_op") or op in ("isend", "irecv")
                   else 0.0}
        with experiment_span(SPAN_PREFIX + op, model_name=dtype,
                             step=parent.step if parent is not None else None,
                             epoch=parent.epoch if parent is not None else None,
                             metrics=metrics):
            return fn(*args, **kwargs)

    collective.__renacer_original__ = fn  # type: ignore[attr-defined]
    return collective


def _forgetting(fn: Callable[..., Any]) -> Callable[..., Any]:
    """destroy_process_group, which also drops what is known of the groups (the cache must
    not keep a destroyed group alive, and a new default group may differ)."""

    @functools.wraps(fn)
    def destroy_process_group(*args: Any, **kwargs: Any) -> Any:
        _groups.clear()
        if not args and kwargs.get("group") is None:
            _seq.clear()  # every group is gone: a new init numbers from 1 again, as ranks do
        return fn(*args, **kwargs)

    return destroy_process_group


def install() -> None:
    """Wrap torch.distributed's collectives (idempotent)."""
    if "destroy_process_group" not in _originals:
        fn = _originals["destroy_process_group"] = c10d.destroy_process_group
        wrapped = _forgetting(fn)
        c10d.destroy_process_group = wrapped
        if getattr(dist, "destroy_process_group", None) is fn:
            dist.destroy_process_group = wrapped
    for op in COLLECTIVES:
        fn = getattr(c10d, op, None)
        if fn is None or op in _originals:
            continue
        _originals[op] = fn
        wrapped = _wrap(op, fn)
        setattr(c10d, op, wrapped)
        if getattr(dist, op, None) is fn:
            setattr(dist, op, wrapped)


def uninstall() -> None:
    """Put the original functions back (and forget the groups: a new init may reuse ids)."""
    _groups.clear()
    for op, fn in _originals.items():
        if getattr(dist, op, None) is getattr(c10d, op, None):
            setattr(dist, op, fn)
        setattr(c10d, op, fn)
    _originals.clear()


@contextlib.contextmanager
def collective_spans() -> Iterator[None]:
    """install() for the duration of a with block."""
    fresh = not _originals
    install()
    try:
        yield
    finally:
        if fresh:
            uninstall()
