"""The CUDA event source of a tracing run: finds libraries, probes them, writes the gpu layer."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field

import numpy as np

from renacerd.capture.cuda.maps import family_of
from renacerd.capture.cuda.names import KernelNames
from renacerd.capture.probes.cuda import CudaProbes, ProbedObject
from renacerd.capture.probes.loader import ProbeError
from renacerd.cuda.hooks import DRIVER, HOOKS, LAUNCH, MEMCPY
from renacerd.cuda.records import GPU_LAYOUT
from renacerd.syscall_table import NR_EXECVE, NR_EXECVEAT, NR_OPEN, NR_OPENAT, NR_OPENAT2

log = logging.getLogger("renacerd")


# fn id -> is a driver launch (its handle is a CUfunction, not a host stub)
_DRIVER_LAUNCH = np.array(
    [False] + [h.kind == LAUNCH and h.family == DRIVER for h in HOOKS], dtype=bool
)
_IS_LAUNCH = np.array([False] + [h.kind == LAUNCH for h in HOOKS], dtype=bool)
# driver copies carry their direction in the symbol, not an argument
_COPY_KIND = np.array(
    [0] + [h.copy_kind if h.kind == MEMCPY and h.family == DRIVER else -1 for h in HOOKS],
    dtype=np.int64,
)


class CudaOptionError(ValueError):
    """Bad --cuda value (one line, exit 2)."""


@dataclass(slots=True)
class CudaOptions:
    """--cuda auto|off|PATH... and --cuda-force."""

    mode: str = "auto"                      # auto | off | paths
    paths: list[str] = field(default_factory=list)
    force: bool = False

    @classmethod
    def parse(cls, values: list[str] | None, force: bool = False) -> CudaOptions:
        """From the CLI's --cuda values (nargs='+'; None means the default, auto)."""
        if not values or values == ["auto"]:
            return cls("auto", [], force)
        if values == ["off"]:
            return cls("off", [], force)
        for v in values:
            if v in ("auto", "off"):
                raise CudaOptionError(f"--cuda {v} cannot be combined with paths")
            if not os.path.isfile(v):
                raise CudaOptionError(f"--cuda: no such library: {v}")
        return cls("paths", [os.path.abspath(v) for v in values], force)


def system_cuda_libraries() -> list[str]:
    """CUDA runtime / driver / NCCL copies the dynamic linker knows (ldconfig's cache)."""
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.splitlines():
        if "=>" not in line or "x86-64" not in line:
            continue
        path = line.rsplit("=>", 1)[1].strip()
        if family_of(path) and os.path.exists(path):
            found.append(os.path.realpath(path))
    return sorted(set(found))


class CudaSource:
    """A tracer Source: uprobes on every CUDA copy the traced tree maps."""

    def __init__(self, probes: CudaProbes, options: CudaOptions, shared_targets: bool) -> None:
        self.probes = probes
        self.options = options
        self.shared_targets = shared_targets
        self.names = KernelNames(exe_paths=self._exe_paths)
        self._procs: dict = {}  # the tracer's processes, as of the last drain
        self.scanned: set[int] = set()
        self.own_targets: set[int] = set()
        self.buf: dict[int, list[dict[str, np.ndarray]]] = {}
        self.events = 0
        self.attach_latency_ns: list[int] = []  # library open -> probes attached
        self._strings_seen = 0  # tracer string ids already tested for ".so"
        self._is_lib = np.zeros(1024, dtype=bool)
        self._any_lib = False

    @classmethod
    def for_tracer(cls, tracer, options: CudaOptions) -> CudaSource | None:
        """Build, load and pre-attach for a Tracer; None with --cuda off."""
        if options.mode == "off":
            return None
        fd = None
        bpf = getattr(tracer.probes, "bpf", None)
        if bpf is not None:
            fd = bpf["targets"].map_fd
        probes = CudaProbes(targets_fd=fd, force=options.force)
        try:
            probes.load()
        except ProbeError:
            if fd is None:
                raise
            # No bpffs to hand the map over: keep our own, synced every drain.
            probes = CudaProbes(targets_fd=None, force=options.force)
            probes.load()
            fd = None
        src = cls(probes, options, shared_targets=fd is not None)
        # auto: only what the traced tree maps (its maps at attach and exec, and every
        # library it opens later). Probing every system copy up front would cost each run
        # seconds of uprobe unregistration at exit (~0.1 s per probe on this kernel).
        paths = options.paths if options.mode == "paths" else []
        for p in paths:
            try:
                probes.probe_object(p)
            except ProbeError as e:
                if options.mode == "paths":
                    probes.close()
                    raise
                log.warning("cuda: %s", e)
        return src

    def preload_for_command(self, cmd: list[str], env: dict[str, str]) -> list[str]:
        """Launch mode: probe the CUDA copies the command links (and cudart linked into the
        executable) before it runs, so calls made by library constructors are not missed."""
        if self.options.mode != "auto":
            return []
        exe = shutil.which(cmd[0], path=env.get("PATH"))
        if exe is None:
            return []
        paths = [os.path.realpath(exe)]
        try:
            # ldd asks the dynamic loader to resolve DT_NEEDED without running the program
            out = subprocess.run(["ldd", exe], capture_output=True, text=True, timeout=5,
                                 env=env).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        for line in out.splitlines():
            if "=>" in line:
                lib = line.split("=>", 1)[1].split("(")[0].strip()
                if lib.startswith("/") and family_of(lib):
                    paths.append(os.path.realpath(lib))
        probed = []
        for p in paths:
            if family_of(p) is None and not self.probes._may_hold_runtime(p):
                continue
            try:
                if self.probes.probe_object(p) is not None:
                    probed.append(p)
            except ProbeError as e:
                log.warning("cuda: %s", e)
        return probed

    # -- discovery -----------------------------------------------------------------------
    def _library_mask(self, tracer) -> np.ndarray:
        """mask[sid]: string `sid` may name a shared object. Each string is looked at once,
        when it first appears; the mask stays longer than the table, so mask[-1] (no path)
        is False."""
        by_id = tracer.strings.by_id
        n, seen = len(by_id), self._strings_seen
        if n > seen:
            if n >= len(self._is_lib):
                grown = np.zeros(max(2 * len(self._is_lib), n + 1), dtype=bool)
                grown[:seen] = self._is_lib[:seen]
                self._is_lib = grown
            # thousands of new names a second (a loader's shm files): one search over all
            # of them, then one per name only when some name may be a library
            if b".so" in b"\0".join(by_id[seen:n]):
                for i in range(seen, n):
                    if b".so" in by_id[i]:
                        self._is_lib[i] = self._any_lib = True
            self._strings_seen = n
        return self._is_lib

    def on_syscalls(self, tracer, ev: np.ndarray, s0: np.ndarray) -> None:
        """Library opens and execs of the traced tree: probe what they bring, now."""
        if self.options.mode != "auto":
            return
        # A data loader opens thousands of files a second and almost none is a library:
        # test the string ids against the (few) library paths, not each path.
        is_lib = self._library_mask(tracer)
        if self._any_lib:
            cand = np.flatnonzero(is_lib[s0])
            nr, ret = ev["nr"][cand], ev["ret"][cand]
            opened = cand[((nr == NR_OPENAT) | (nr == NR_OPEN) | (nr == NR_OPENAT2))
                          & (ret >= 0)]
            for i in opened.tolist():
                self._library_opened(tracer.strings_by_id(int(s0[i])), int(ev["pid"][i]),
                                     int(ev["ts"][i]))
        nr = ev["nr"]
        execs = (nr == NR_EXECVE) | (nr == NR_EXECVEAT)  # two compares beat isin's sort
        for i in np.flatnonzero(execs & (ev["ret"] == 0)):
            self.scanned.discard(int(ev["pid"][i]))  # a new image: rescan its maps

    def _library_opened(self, raw: bytes, pid: int, ts: int) -> None:
        """Probe a library the process `pid` just opened, if it is one of ours."""
        path = raw.decode("utf-8", "surrogateescape")
        if not path.startswith("/"):
            try:
                path = os.path.join(os.readlink(f"/proc/{pid}/cwd"), path)
            except OSError:
                return
        full = f"/proc/{pid}/root{path}"
        if family_of(path) is None and not self.probes._may_hold_runtime(full):
            return
        try:
            obj = self.probes.probe_object(full)
        except ProbeError:
            return  # the process is gone; its children re-open and re-trigger
        if obj is not None:
            self._attached(obj, ts)
            self.names.snapshot_maps(pid)

    def _attached(self, obj: ProbedObject, opened_ts: int) -> None:
        lat = obj.attached_ns - opened_ts
        self.attach_latency_ns.append(lat)
        log.info("cuda: probed %s (%d symbols) %.1f ms after it was opened", obj.path,
                 len(obj.symbols), lat / 1e6)

    def _scan_new(self, tracer) -> None:
        for pid, st in tracer.procs.items():
            if st.ended:
                if pid in self.own_targets:
                    self.probes.remove_target(pid)
                    self.own_targets.discard(pid)
                continue
            if not self.shared_targets and pid not in self.own_targets:
                self.probes.add_target(pid)
                self.own_targets.add(pid)
            if pid in self.scanned:
                continue
            self.scanned.add(pid)
            if self.options.mode == "auto":
                for obj in self.probes.probe_process(pid):
                    log.info("cuda: probed %s (%d symbols) in pid %d", obj.path,
                             len(obj.symbols), pid)
            self.names.snapshot_maps(pid)

    # -- events ----------------------------------------------------------------------------
    def _exe_paths(self, pid: int) -> list[str]:
        """Files that may be pid's executable: its exec'd path, and every probed object (an
        executable with the runtime linked in)."""
        st = self._procs.get(pid)
        exe = st.span.exe if st is not None else ""
        return ([exe] if exe.startswith("/") else []) + [o.path for o in self.probes.probed()]

    def drain(self, tracer) -> None:
        """Read the rings; decode launches' names; buffer rows per process."""
        self._procs = tracer.procs
        self._scan_new(tracer)
        ev, names = self.probes.drain()
        if len(names):
            self.names.take(names)
        if not len(ev):
            return
        self.events += len(ev)
        fn = ev["fn"].astype(np.int64)
        a = ev["a"]
        name = np.full(len(ev), -1, dtype=np.int32)
        for i in np.flatnonzero(_IS_LAUNCH[fn]):
            n, _how = self.names.resolve(int(ev["pid"][i]), int(a[i, 0]),
                                         bool(_DRIVER_LAUNCH[fn[i]]))
            name[i] = tracer.strings.intern(n.encode())
        copy_kind = _COPY_KIND[fn]
        a3 = np.where(copy_kind >= 0, copy_kind.astype(np.uint64), a[:, 3])
        d = ev["d"]
        cols = {
            "ts": ev["ts"].astype(np.int64), "dur": ev["dur"], "ret": ev["ret"],
            "tid": ev["tid"], "fn": ev["fn"], "flags": ev["flags"],
            "a0": a[:, 0], "a1": a[:, 1], "a2": a[:, 2], "a3": a3, "a4": a[:, 4],
            "gx": d[:, 0], "gy": d[:, 1], "gz": d[:, 2], "bx": d[:, 3], "by": d[:, 4],
            "bz": d[:, 5], "name": name,
        }
        pid = ev["pid"]
        for p in np.unique(pid):
            sel = pid == p
            self.buf.setdefault(int(p), []).append({k: v[sel] for k, v in cols.items()})

    def flush(self, tracer) -> None:
        """Write one gpu chunk per process with buffered rows."""
        for pid in list(self.buf):
            st = tracer.procs.get(pid)
            if st is None:
                continue  # its fork record comes with a later drain
            parts = self.buf.pop(pid)
            cols = {k: np.concatenate([p[k] for p in parts]) for k, _ in GPU_LAYOUT}
            order = np.argsort(cols["ts"], kind="stable")
            cols = {k: v[order] for k, v in cols.items()}
            with tracer.lock:
                tracer.store.add_chunk(tracer.run_id, st.proc_id, cols, layer="gpu",
                                       layout=GPU_LAYOUT)

    def counters(self) -> dict[str, int]:
        """Kernel counters plus what discovery and naming did."""
        c = self.probes.counters()
        c["gpu_events"] = self.events
        c["gpu_objects_probed"] = len(self.probes.probed())
        c["gpu_unresolved_launches"] = self.names.unresolved()
        return c

    def close(self) -> None:
        """Detach every uprobe."""
        self.probes.close()
