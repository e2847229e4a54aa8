"""Trace device/gpu_train.py under renacerd's Tracer with the CUDA source; check and report.

argv: repo, python, steps, untraced.json, out_dir. Prints the report and writes
out_dir/gpu_report.txt.
"""

import glob
import json
import os
import statistics
import sys
import time

from renacerd.capture.cuda_source import CudaOptions, CudaSource
from renacerd.capture.probes.syscalls import SyscallProbes
from renacerd.capture.tracer import Tracer
from renacerd.serve.session import HeldChild
from renacerd.store.database import Store
from renacerd.trace.gpu_trace import gpu_by_interval, load_gpu, summarize


class _T:
    def __init__(self, gpu):
        self.gpu, self.strings, self.spans = gpu, gpu["strings"], []


def main() -> int:
    repo, py, steps, untraced_json, out_dir = sys.argv[1:6]
    lines: list[str] = []

    def say(s: str) -> None:
        lines.append(s)
        print(s, flush=True)

    db = os.path.join(out_dir, "gpu.db")
    traced_json = os.path.join(out_dir, "traced_steps.json")
    cmd = [py, os.path.join(repo, "device/gpu_train.py"), steps, traced_json]
    child = HeldChild(cmd, dict(os.environ))
    probes = SyscallProbes()
    probes.load()
    store = Store(db, create=True)
    tracer = Tracer(probes, store, "gpu-check", cmdline=cmd)
    t0 = time.monotonic()
    src = CudaSource.for_tracer(tracer, CudaOptions.parse(None))
    # The launched interpreter loads its wheel copies of cudart/NCCL at `import torch` and
    # registers kernels in their constructors at once: probe them before it starts.
    site = os.path.dirname(os.path.dirname(py))
    pre = glob.glob(f"{site}/lib/python3*/site-packages/nvidia/*/lib/lib*.so*") + glob.glob(
        f"{site}/lib/python3*/site-packages/torch/lib/lib*.so*")
    for p in pre:
        if not ("cudart" in p or "nccl" in p):
            continue
        try:
            src.probes.probe_object(p)
        except Exception as e:  # noqa: BLE001 - report and go on
            say(f"pre-probe {p}: {e}")
    say(f"probes loaded in {time.monotonic() - t0:.1f} s; objects probed before launch: "
        + ", ".join(o.path for o in src.probes.probed()))
    tracer.sources.append(src)
    tracer.adopt_launched(child.pid)
    err = child.release()
    if err:
        say(f"exec failed: {err}")
        return 1
    tracer.run(duration=240)
    tracer.finish()
    counters = src.counters()
    probed = [o.path for o in src.probes.probed()]
    lat = src.attach_latency_ns
    src.close()
    probes.close()
    store.close()
    st = Store(db)
    info = st.run("gpu-check")
    strings = st.strings(info.id)
    spans = json.load(open(traced_json))
    base = json.load(open(untraced_json))
    root = None
    for proc_id, p in st.processes(info.id):
        g = load_gpu(st, info.id, proc_id, strings)
        if len(g["columns"]["ts"]):
            root = g
            say(f"pid {p.pid} {p.name}: {len(g['columns']['ts'])} GPU API calls")
    say(f"probed objects: {probed}")
    say(f"library attach latency after open (ms): {[round(x / 1e6, 1) for x in lat]}")
    say(f"counters: {counters}")
    ok = True
    if root is None:
        say("FAIL: no GPU calls recorded")
        return 1
    s = summarize(root["columns"], strings)
    top = sorted(s["kernels"].items(), key=lambda kv: -kv[1])[:8]
    say(f"kernels: {len(s['kernels'])} distinct, {sum(s['kernels'].values())} launches, "
        f"{s['unresolved_kernels']} unresolved; top: {top}")
    say(f"memcpy {s['memcpy']} other {s['memcpy_other']}; malloc {s['malloc']}; "
        f"free {s['free']}; outstanding {s['outstanding']}; sync {s['sync']}")
    per = gpu_by_interval(_T(root), [(str(x["step"]), x["start"], x["end"]) for x in spans])
    for k in list(per)[:3] + list(per)[-2:]:
        v = per[k]
        say(f"step {k}: launches {sum(v['kernels'].values())} h2d {v['memcpy']['h2d_bytes']} "
            f"d2h {v['memcpy']['d2h_bytes']} malloc {v['malloc']['calls']} "
            f"sync {v['sync']['calls']}")
    expect_h2d = 256 * 512 * 4 + 256 * 8
    for k, v in per.items():
        n = sum(v["kernels"].values())
        if n == 0 or v["memcpy"]["h2d_bytes"] < expect_h2d or v["memcpy"]["d2h_bytes"] < 4:
            say(f"FAIL step {k}: launches {n}, h2d {v['memcpy']['h2d_bytes']} "
                f"(expected >= {expect_h2d}), d2h {v['memcpy']['d2h_bytes']}")
            ok = False
    if s["malloc"]["calls"] == 0:
        say("FAIL: no device allocation recorded")
        ok = False
    named = sum(n for k, n in s["kernels"].items() if not k.startswith("0x"))
    if named == 0:
        say("FAIL: no kernel name resolved")
        ok = False
    if counters.get("gpu_events_lost", 0):
        say(f"FAIL: {counters['gpu_events_lost']} GPU events lost")
        ok = False
    # steady state: skip the first 5 steps (warm-up, lazy module loading)
    tr = statistics.median((x["end"] - x["start"]) for x in spans[5:])
    un = statistics.median((x["end"] - x["start"]) for x in base[5:])
    say(f"median step: untraced {un / 1e6:.3f} ms, traced {tr / 1e6:.3f} ms, "
        f"ratio {tr / un:.2f}")
    say("RESULT: " + ("PASS" if ok else "FAIL"))
    with open(os.path.join(out_dir, "gpu_report.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
