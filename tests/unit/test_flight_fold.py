"""The flight recorder's fold on a real SQLite store: a run folded slice by slice (its
syscall and GPU layers) reads the same in every report as the same run kept whole, GPU
allocations freed in a later slice included."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import numpy as np
import orjson

from renacerd.cli.renacer_main import main as renacer
from renacerd.cuda.hooks import FN_ID, H2D
from renacerd.cuda.records import GPU_LAYOUT
from renacerd.store.database import Store
from renacerd.store.flight import finish_flight, fold_events
from renacerd.trace.unified_trace import ProcessSpan
from tests.retention_store import STEP_NS, TABLE, step_cols, step_span
from tests.unit.test_retention import _reports

STEPS = 6
READS = 50
GEMM, RELU = 2, 3  # string ids of the kernel names


def gpu_cols(step: int) -> dict[str, np.ndarray]:
    """One step's CUDA calls: a malloc, the free of the step before's, `step + 1` gemm and
    two relu launches, a 4 KiB copy to the device; a pointer allocated twice in steps 0
    and 1 and never freed (the first one is outstanding for good)."""
    calls: list[tuple[str, int, int, int, int]] = [("cudaMalloc", 0x1000 + step,
                                                    1000 * (step + 1), 0, -1)]
    if step:
        calls.append(("cudaFree", 0x1000 + step - 1, 0, 0, -1))
    if step < 2:
        calls.append(("cudaMalloc", 0x9000, 7 + 2 * step, 0, -1))
    calls += [("cudaLaunchKernel", 0, 0, 0, GEMM)] * (step + 1)
    calls += [("cudaLaunchKernel", 0, 0, 0, RELU)] * 2
    calls.append(("cudaMemcpy", 0, 0, 4096, -1))
    c = {name: np.zeros(len(calls), dtype=dt) for name, dt in GPU_LAYOUT}
    c["ts"][:] = step * STEP_NS + 500_000 + np.arange(len(calls)) * 1000
    c["dur"][:] = 300
    c["tid"][:] = 7
    for i, (fn, a0, a1, a2, name) in enumerate(calls):
        c["fn"][i], c["a0"][i], c["a1"][i], c["a2"][i], c["name"][i] = (
            FN_ID[fn], a0, a1, a2, name)
        if fn == "cudaMemcpy":
            c["a3"][i] = H2D
    return c


def add_gpu_run(st: Store, name: str, *, flight: bool) -> int:
    """A run of one process, STEPS steps of syscalls and CUDA calls, a chunk of each layer
    per step; a flight run is folded in two parts before it ends, its last steps kept."""
    rng = np.random.default_rng(7)  # the same events in both runs
    run = st.begin_run(name, cmdline=["train"], version="0", syscall_table=TABLE,
                       start_wall_ns=1, start_mono_ns=0)
    p = st.add_process(run, ProcessSpan(pid=100, ppid=1, name="train"))
    st.add_strings(run, [(0, b"/data/in"), (1, b"/data/out"), (GEMM, b"gemm"),
                         (RELU, b"relu")])
    for s in range(STEPS):
        st.add_chunk(run, p, step_cols(s, rng, READS))
        st.add_chunk(run, p, gpu_cols(s), "gpu", GPU_LAYOUT)
    st.add_spans(run, [step_span("r", s) for s in range(STEPS)], {100: p})
    if flight:
        st.begin_flight(run, STEP_NS)
    st.update_run(run, status="complete", end_wall_ns=2, events=STEPS * (READS + 4))
    st.commit()
    if flight:
        # the frees of steps 2 and 4 free allocations of a slice already folded
        assert fold_events(st, name, run, 2 * STEP_NS) > 0
        assert fold_events(st, name, run, 4 * STEP_NS) > 0
        finish_flight(st, name, run)
    return run


def _show(db, run: str) -> dict:
    buf = io.BytesIO()
    out = io.TextIOWrapper(buf, encoding="utf-8")
    with redirect_stdout(out):
        assert renacer(["show", run, "--db", str(db), "--json"]) == 0
        out.flush()
    return orjson.loads(buf.getvalue())


def test_a_folded_run_reads_the_same_as_the_run_kept_whole_gpu_included(tmp_path):
    db = tmp_path / "f.db"
    st = Store(db, create=True)
    add_gpu_run(st, "whole", flight=False)
    fid = add_gpu_run(st, "flight", flight=True)
    left = st.db.execute("SELECT layer, count(*) FROM chunks WHERE run_id=? GROUP BY layer "
                         "ORDER BY layer", (fid,)).fetchall()
    st.close()
    assert left == [("gpu", 2), ("sys", 2)]  # steps 4 and 5, in full
    folded, whole = _reports(db, "flight"), _reports(db, "whole")
    # the one difference: a folded process's kept events start mid-life, so they read as a
    # process traced from the middle does (its fd table at their start is its own)
    assert [p.pop("attached") for p in folded["processes"]] == [True]
    assert [p.pop("attached") for p in whole["processes"]] == [False]
    assert folded == whole
    shown = _show(db, "flight")
    assert shown["pruned"] is True
    (proc,) = shown["processes"]
    gpu = proc["gpu"]
    assert gpu["kernels"] == {"gemm": 21, "relu": 12}
    assert gpu["memcpy"]["h2d_bytes"] == STEPS * 4096
    assert gpu["malloc"] == {"calls": STEPS + 2, "bytes": 21000 + 7 + 9}
    assert gpu["free"] == {"calls": STEPS - 1}
    # 0x1005 (6000 bytes), 0x9000 (9) and the 0x9000 allocated before it (7)
    assert gpu["outstanding"] == {"allocations": 3, "bytes": 6016}
    assert _show(db, "whole")["processes"][0]["gpu"] == gpu
