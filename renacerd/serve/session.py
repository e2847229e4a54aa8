"""One tracing session of `renacerd --pid` / `renacerd -- CMD`: validate, attach, run, report."""

from __future__ import annotations

import errno
import os
import resource
import stat
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import psutil

from renacerd.capture.cuda_source import CudaSource
from renacerd.capture.priority import PriorityGuard
from renacerd.capture.probes.loader import ProbeError
from renacerd.capture.probes.syscalls import SyscallProbes
from renacerd.capture.procfs import CallerSignals, TargetError, check_target
from renacerd.capture.tracer import Summary, Tracer, default_run_name, install_signal_handlers
from renacerd.escaping import escape
from renacerd.serve.span_link import SpanLink, SpanLinkError
from renacerd.store.database import Store, StoreError, default_db_path


class SessionError(RuntimeError):
    """Bad input found before anything was attached (exit status 2)."""


class CommandError(ValueError):
    """The command cannot be executed (one clear line, exit status 2)."""


def resolve_command(name: str, env: Mapping[str, str]) -> str:
    """The file execvp(3) would run for `name` under `env`'s PATH (its default without
    one; no search for a name with a '/'), found before the traced exec so the search's
    failed execve calls are not in the trace (as strace does)."""
    if not name:
        raise CommandError("cannot execute '': empty command name")
    if "/" in name:
        candidates = [name]
    else:  # an empty PATH entry is the cwd: execvp then runs the bare name
        candidates = [os.path.join(d, name) for d in os.get_exec_path(dict(env))]
    denied = False
    for path in candidates:
        try:
            st = os.stat(path)
        except OSError:
            continue  # execvp goes on past ENOENT, ENOTDIR, ELOOP and the like
        if stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK):
            return path
        denied = True  # EACCES: execvp tries the rest and reports this one
    shown = escape(name)
    if denied:
        raise CommandError(f"cannot execute '{shown}': permission denied")
    if "/" in name:
        raise CommandError(f"cannot execute '{shown}': no such file")
    raise CommandError(f"cannot execute '{shown}': not found on PATH")


class HeldChild:
    """A forked child that waits on a pipe before exec, so it is traced from its first call.

    It gets what its caller would give it untraced: the caller's signal dispositions and
    mask (restored from `caller`), no descriptor of renacerd's (all close-on-exec), and the
    limits, nice value, policy, cgroup and cwd renacerd had at the fork (it lowers its own
    priority only later)."""

    def __init__(self, exe: str, cmd: list[str], env: dict[str, str],
                 caller: CallerSignals) -> None:
        go_r, self._go_w = os.pipe()  # os.pipe: O_CLOEXEC, gone at the exec
        self._err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: nothing here may raise past os._exit
            code = 0
            try:
                os.close(self._go_w)
                os.close(self._err_r)
                if os.read(go_r, 1) != b"x":
                    os._exit(127)
                caller.restore()
                try:
                    os.execve(exe, cmd, env)
                except OSError as e:
                    if e.errno != errno.ENOEXEC:
                        raise
                    # what execvp does with a file that is neither ELF nor #!
                    os.execve(_BSHELL, [_BSHELL, exe, *cmd[1:]], env)
            except OSError as e:
                code = e.errno or 0
            except BaseException:
                code = 0
            try:
                os.write(err_w, str(code).encode())
            finally:
                os._exit(127)
        os.close(go_r)
        os.close(err_w)
        self.pid = pid

    def release(self) -> str | None:
        """Let it exec; returns the exec error, if any."""
        os.write(self._go_w, b"x")
        os.close(self._go_w)
        err = os.read(self._err_r, 32)
        os.close(self._err_r)
        if err:
            code = int(err)
            return os.strerror(code) if code else "failed before exec"
        return None

    def abort(self) -> None:
        """Make it exit without exec, and reap it."""
        try:
            os.close(self._go_w)
            os.close(self._err_r)
        except OSError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


_BSHELL = "/bin/sh"


class Sink(Protocol):
    """What the session stops at the end: a sink tailing the store on its own thread."""

    def stop(self, drain_s: float) -> None: ...


StartSinks = Callable[[Path, str], "list[Sink]"]


class Session:
    """Everything one `renacerd` invocation owns."""

    def __init__(self, args, cmd: list[str], caller: CallerSignals | None = None,
                 start_sinks: StartSinks | None = None) -> None:
        """`caller`: what renacerd's caller gave it, captured at start (launch mode);
        `start_sinks(db_path, run)` starts the sinks that tail the store (from the CLI, since
        sinks read the store and come after this stage)."""
        self.args = args
        self.start_sinks = start_sinks
        self.cmd = cmd
        self.caller = caller or CallerSignals.capture()
        self.exe = ""
        if cmd:
            try:
                self.exe = resolve_command(cmd[0], os.environ)
            except CommandError as e:
                raise SessionError(str(e)) from e
        for pid in args.pid:
            try:
                check_target(pid)
            except TargetError as e:
                raise SessionError(str(e)) from e
        self.db_path = args.db or default_db_path()
        try:
            self.store = Store(self.db_path, create=True)
        except StoreError as e:
            raise SessionError(str(e)) from e
        self.store.mark_stale_runs_incomplete()
        self.run_name = args.run or default_run_name(cmd or None)
        if self.store.run_exists(self.run_name):
            raise SessionError(f"run '{escape(self.run_name)}' already exists in "
                               f"{self.db_path}")
        self.quiet = args.quiet
        owner = getattr(args, "owner_uid", None)
        self.owner_uid = os.getuid() if owner is None else owner
        self.span_link = None

    def _say(self, msg: str) -> None:
        if not self.quiet:
            sys.stderr.write(f"renacerd: {msg}\n")

    def run(self) -> int:
        """Attach or launch, trace until done, print the summary; returns the exit status."""
        args = self.args
        env = dict(os.environ)
        child = None
        try:
            self.span_link = SpanLink.for_session(args.socket, launch=bool(self.cmd))
        except SpanLinkError as e:
            sys.stderr.write(f"renacerd: error: {e}\n")
            return 2
        if self.span_link is not None:
            env["RENACER_SOCKET"] = self.span_link.path
        if self.cmd:
            child = HeldChild(self.exe, self.cmd, env, self.caller)
        probes = SyscallProbes(
            follow=not args.no_follow, event_mb=args.ring_mb, detail_mb=args.detail_ring_mb,
            owner_uid=self.owner_uid,
        )
        try:
            probes.load()
        except ProbeError as e:
            if child is not None:
                child.abort()
            if self.span_link is not None:
                self.span_link.close()
            sys.stderr.write(f"renacerd: error: {e}\n")
            return 2
        try:
            tracer = Tracer(
                probes,
                self.store,
                self.run_name,
                cmdline=self.cmd or [f"--pid={p}" for p in args.pid],
                follow=not args.no_follow,
                owner_uid=self.owner_uid,
            )
        except StoreError as e:  # e.g. another daemon took the run name meanwhile
            if child is not None:
                child.abort()
            if self.span_link is not None:
                self.span_link.close()
            probes.close()
            sys.stderr.write(f"renacerd: error: {e}\n")
            return 2
        cuda_src = None
        try:
            cuda_src = CudaSource.for_tracer(tracer, args.cuda_options)
        except ProbeError as e:
            if args.cuda_options.mode == "paths":
                if self.span_link is not None:
                    self.span_link.close()
                tracer.finish(status="incomplete", error=str(e))
                if child is not None:
                    child.abort()
                probes.close()
                sys.stderr.write(f"renacerd: error: {e}\n")
                return 2
            self._say(f"CUDA probes off: {e}")
        if cuda_src is not None:
            tracer.sources.append(cuda_src)
            if self.cmd:
                cuda_src.preload_for_command([self.exe, *self.cmd[1:]], env)
        # Sinks tail the committed store on their own threads: the network never slows capture.
        sinks = self.start_sinks(self.db_path, self.run_name) if self.start_sinks else []
        status, error = "complete", None
        store_failed = False
        gone = False  # a --pid target exited before the attach
        guard: PriorityGuard | None = None
        try:
            if self.span_link is not None:
                self.span_link.attach(tracer, [child.pid] if child is not None else args.pid)
            if child is not None:
                tracer.adopt_launched(child.pid)
                err = child.release()
                if err is not None:
                    error = f"cannot execute '{escape(self.cmd[0])}': {err}"
                    tracer._reap_root(block=True)  # it exits 127 at once
            else:
                for pid in args.pid:
                    try:
                        tracer.attach(pid)
                    except psutil.NoSuchProcess:
                        # It exited between the checks and the attach (probes load first).
                        status = "incomplete"
                        error = f"process {pid} exited before it could be traced"
                        gone = True
                        break
            if not gone:
                self._say(f"tracing run {escape(self.run_name)} (store {escape(self.db_path)})")
            install_signal_handlers(tracer)
            if error is None and args.priority == "idle":
                rings = probes.rings() + (cuda_src.probes.rings() if cuda_src else [])
                try:
                    guard = PriorityGuard([(r.map_fd, r.data_size) for r in rings])
                    tracer.sources.append(guard)
                except OSError as e:
                    self._say(f"priority stays normal: {e.strerror or e}")
            if getattr(args, "ready_fd", None) is not None and not gone:
                # Probes attached, the first commit done, the daemon at its priority:
                # `renacerd serve` may ack now.
                os.write(args.ready_fd, b"ready\n")
                os.close(args.ready_fd)
            if error is None:
                tracer.run(duration=args.duration)
        except StoreError as e:
            status, error = "incomplete", str(e)
            store_failed = True
        except BaseException as e:  # never leave probes in the kernel
            status, error = "incomplete", f"{type(e).__name__}: {e}"
            raise
        finally:
            summary = None
            try:
                if guard is not None:
                    guard.stop()
                if self.span_link is not None:
                    self.span_link.close()
                summary = tracer.finish(status=status, error=error)
                error = tracer.final_error or error
            except StoreError as e:
                error = str(e)
            finally:
                if guard is not None:
                    guard.close()
                if cuda_src is not None:
                    cuda_src.close()
                probes.close()
            try:
                self.store.close()
            except Exception:
                pass
            for sink in sinks:
                sink.stop(drain_s=10)
        if error is not None:
            sys.stderr.write(f"renacerd: error: {error}\n")
            if summary is None or gone or child is not None and summary.exit_status == 127:
                return 2
        if summary is not None:
            self._print_summary(summary)
            if child is not None and summary.exit_status is None:
                self._say(f"detached; command still running as pid {child.pid}")
        if store_failed:
            return 2
        if child is not None and summary is not None and summary.exit_status is not None:
            return summary.exit_status
        return 0

    def _print_summary(self, s: Summary) -> None:
        lost = (s.lost.get("events_lost", 0) + s.lost.get("details_lost", 0)
                + s.lost.get("gpu_events_lost", 0) + s.lost.get("gpu_names_lost", 0))
        failed = s.lost.get("failed_reads", 0)
        self._say(
            f"run {escape(s.run)}: {s.processes} process{'es' if s.processes != 1 else ''}, "
            f"{s.events} events, {lost} lost, {failed} failed reads, "
            f"{s.lost.get('truncated', 0)} truncated, "
            f"{s.wall_s:.2f} s wall, status {s.status}"
        )
        if lost:
            self._say(
                f"LOST EVENTS: {s.lost.get('events_lost', 0)} events, "
                f"{s.lost.get('details_lost', 0)} argument records, "
                f"{s.lost.get('gpu_events_lost', 0)} GPU events (ring buffer full; "
                "raise --ring-mb)"
            )
        if s.lost.get("priority_escalations"):
            self._say(f"priority: lifted to normal {s.lost['priority_escalations']} times "
                      "(a ring buffer over a quarter full, or a late commit)")
        if s.lost.get("gpu_events"):
            self._say(f"GPU: {s.lost['gpu_events']} CUDA calls recorded from "
                      f"{s.lost.get('gpu_objects_probed', 0)} libraries")
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self._say(
            f"store {escape(s.db)}; daemon peak RSS {ru.ru_maxrss / 1024:.0f} MB, CPU "
            f"{ru.ru_utime + ru.ru_stime:.2f} s; see `renacer show {escape(s.run)}`"
        )
