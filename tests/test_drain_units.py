"""The drain loop's pacing and the CUDA source's library filter, without a kernel."""

from types import SimpleNamespace

import numpy as np

from renacerd.daemon.cuda_source import CudaOptions, CudaSource
from renacerd.daemon.tracer import (
    MIN_DRAIN_INTERVAL,
    ProcState,
    StringTable,
    _take_exec,
    drain_wait,
)
from renacerd.unified_trace import ProcessSpan


def test_drain_wait_idle_rings_sleep_the_longest():
    assert drain_wait((0, 0), (1000, 100), 0.04, 0.04) == 0.04


def test_drain_wait_keeps_the_fuller_ring_under_an_eighth():
    # 100 of 1000 events in 0.04 s: an eighth takes 0.05 s, capped at the longest wait
    assert drain_wait((100, 0), (1000, 100), 0.04, 0.04) == 0.04
    # 500 of 1000 events in 0.04 s: an eighth fills in 0.01 s
    assert drain_wait((500, 0), (1000, 100), 0.04, 0.04) == 0.01
    # the detail ring decides when it is the fuller one
    assert drain_wait((10, 50), (1000, 100), 0.04, 0.04) == 0.01


def test_drain_wait_has_a_floor_and_ignores_unknown_capacity():
    assert drain_wait((1000, 0), (1000, 100), 0.001, 0.04) == MIN_DRAIN_INTERVAL
    assert drain_wait((1000, 1000), (0, 0), 0.04, 0.04) == 0.04


def _source_and_tracer():
    src = CudaSource(probes=None, options=CudaOptions(), shared_targets=True)
    return src, SimpleNamespace(strings=StringTable())


def test_library_mask_marks_each_shared_object_path_once():
    src, tracer = _source_and_tracer()
    ids = [tracer.strings.intern(p) for p in
           (b"/data/shard-001.bin", b"/usr/lib/libcudart.so.12", b"/dev/shm/torch_1")]
    mask = src._library_mask(tracer)
    assert mask[ids].tolist() == [False, True, False]
    assert not mask[-1]  # s0 == -1: the event has no path
    assert src._any_lib


def test_library_mask_grows_with_the_string_table():
    src, tracer = _source_and_tracer()
    assert not src._library_mask(tracer).any()
    assert not src._any_lib
    ids = [tracer.strings.intern(f"/x/{i}.bin".encode()) for i in range(3000)]
    last = tracer.strings.intern(b"/opt/nccl/libnccl.so.2")
    mask = src._library_mask(tracer)
    assert len(mask) > last + 1
    assert np.flatnonzero(mask).tolist() == [last]
    assert not mask[ids].any() and not mask[-1]


def test_each_execve_takes_the_kernel_copy_of_its_own_exec():
    # One drain held two execs of a process (lifecycle records are handled first): each
    # execve record, entry ts to ts + dur, takes the copy made inside it.
    st = ProcState(proc_id=1, span=ProcessSpan(pid=7))
    st.execs = [(150, b"/a", b"a"), (250, b"/bin/sh", b"sh\0-c\0exit 5")]
    assert _take_exec(st, 100, 160) == (150, b"/a", b"a")
    assert _take_exec(st, 200, 260) == (250, b"/bin/sh", b"sh\0-c\0exit 5")
    assert _take_exec(st, 300, 310) == (0, None, None)
    # a copy whose execve record never came (lost) is dropped by the next execve
    st.execs = [(50, b"/lost", None), (350, b"/c", b"c")]
    assert _take_exec(st, 300, 360) == (350, b"/c", b"c") and st.execs == []
