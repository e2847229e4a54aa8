"""A store of synthetic runs for the retention tests: real SQLite, real chunks, step spans."""

from __future__ import annotations

import numpy as np

from renacerd.columns import SYSCALL_COLUMNS
from renacerd.store.database import Store
from renacerd.trace.unified_trace import ProcessSpan

READ, WRITE, CLOSE, OPENAT = 0, 1, 3, 257
TABLE = {READ: "read", WRITE: "write", CLOSE: "close", OPENAT: "openat"}
STEPS = 4
STEP_NS = 1_000_000
READS = 2000  # reads per step


def step_cols(step: int, rng: np.random.Generator, reads: int = READS) -> dict[str, np.ndarray]:
    """One step's events: openat /data/in -> 3, `reads` reads of fd 3 (the last one -EBADF),
    a write of 10 bytes to /data/out (fd 4, opened second), close 3. Durations random so the
    chunk does not compress to nothing."""
    n = reads + 4
    c = {name: np.zeros(n, dtype=dt) for name, dt in SYSCALL_COLUMNS}
    c["ts"][:] = step * STEP_NS + 10 + np.arange(n) * 100
    c["dur"][:] = rng.integers(1, 1 << 24, n)
    c["tid"][:] = 7
    c["s0"][:] = -1
    c["s1"][:] = -1
    c["nr"][0], c["ret"][0], c["s0"][0], c["a0"][0] = OPENAT, 3, 0, np.uint64(2**64 - 100)
    c["nr"][1], c["ret"][1], c["s0"][1], c["a0"][1] = OPENAT, 4, 1, np.uint64(2**64 - 100)
    c["aux"][1] = 0o1101  # O_WRONLY|O_CREAT|O_TRUNC
    c["nr"][2:2 + reads], c["a0"][2:2 + reads], c["ret"][2:2 + reads] = READ, 3, 100
    c["ret"][1 + reads] = -9
    c["nr"][2 + reads], c["a0"][2 + reads], c["ret"][2 + reads] = WRITE, 4, 10
    c["nr"][3 + reads], c["a0"][3 + reads] = CLOSE, 3
    return c


def step_span(run_tag: str, step: int, pid: int = 100):
    """The span of one step, carrying experiment.step."""
    from tests.conftest import span_record

    sp = span_record(f"{run_tag}s{step}".encode(), None, pid, step * STEP_NS,
                     (step + 1) * STEP_NS)
    sp.attributes_json = f'{{"experiment.step": {step}}}'
    return sp


def add_run(st: Store, name: str, seed: int, *, end: bool = True, wall_ns: int = 1,
            reads: int = READS, steps: int = STEPS, owner_uid: int = 0) -> int:
    """A run of one process: `steps` steps, one chunk each; ended 'complete' (`end`)."""
    rng = np.random.default_rng(seed)
    run = st.begin_run(name, cmdline=["train"], version="0", syscall_table=TABLE,
                       start_wall_ns=wall_ns, start_mono_ns=0, owner_uid=owner_uid)
    p = st.add_process(run, ProcessSpan(pid=100, ppid=1, name="train"))
    st.add_strings(run, [(0, b"/data/in"), (1, b"/data/out")])
    for s in range(steps):
        st.add_chunk(run, p, step_cols(s, rng, reads))
    st.add_spans(run, [step_span(name, s) for s in range(steps)], {100: p})
    if end:
        st.update_run(run, status="complete", end_wall_ns=wall_ns + 1,
                      events=steps * (reads + 4))
    st.commit()
    return run
