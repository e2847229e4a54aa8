"""One tracing session of `renacerd --pid` / `renacerd -- CMD`: validate, attach, run, report."""

from __future__ import annotations

import errno
import os
import resource
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from renacerd.capture.command import (
    CallerSignals,
    CommandError,
    default_run_name,
    resolve_command,
)
from renacerd.capture.cuda_source import CudaOptions, CudaSource
from renacerd.capture.priority import PriorityGuard
from renacerd.capture.probes.loader import ProbeError
from renacerd.capture.probes.syscalls import SyscallProbes
from renacerd.capture.procfs import TargetError, check_target
from renacerd.capture.tracer import Summary, Tracer, install_signal_handlers
from renacerd.escaping import escape
from renacerd.serve.span_feed import SpanFeed, SpanFeedError
from renacerd.store.database import Store, StoreError, default_db_path


class SessionError(RuntimeError):
    """Bad input found before anything was attached (exit status 2)."""


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
        self._released = False

    def release(self) -> str | None:
        """Let it exec; returns the exec error, if any."""
        self._released = True
        os.write(self._go_w, b"x")
        os.close(self._go_w)
        err = os.read(self._err_r, 32)
        os.close(self._err_r)
        if err:
            code = int(err)
            return os.strerror(code) if code else "failed before exec"
        return None

    def abort_unless_released(self) -> None:
        """abort() if it was never let go to exec (setup failed before the release)."""
        if not self._released:
            self.abort()

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


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """What one `renacerd --pid` / `renacerd -- CMD` was asked to do, checked by the CLI."""

    cmd: tuple[str, ...] = ()
    pids: tuple[int, ...] = ()
    db: str | None = None
    run: str | None = None
    socket: str | None = None
    follow: bool = True
    duration: float | None = None
    quiet: bool = False
    ring_mb: float = 32
    detail_ring_mb: float = 8
    cuda: CudaOptions = field(default_factory=CudaOptions)
    priority: str = "idle"
    owner_uid: int | None = None
    ready_fd: int | None = None  # `renacerd serve` learns here that the probes are attached
    # store.retention.Policy: applied every minute while tracing and once at the end
    retention: Any = None


@dataclass(slots=True)
class _Outcome:
    """How the run ends, filled in as it goes: status, the error, what failed."""

    status: str = "complete"
    error: str | None = None
    store_failed: bool = False
    gone: bool = False  # a --pid target exited before the attach
    summary: Summary | None = None


def _once(fn: Callable[..., object], *args: object) -> Callable[[], None]:
    """fn(*args) the first time the returned callable is called, nothing after."""
    done = False

    def call() -> None:
        nonlocal done
        if not done:
            done = True
            fn(*args)

    return call


def _nothing() -> None:
    """Nothing to close (no span feed, no CUDA source)."""


class _Refused(Exception):
    """A failure before tracing began: one line, exit status 2, once everything is undone."""


class Session:
    """Everything one `renacerd` invocation owns."""

    def __init__(self, config: SessionConfig, caller: CallerSignals | None = None,
                 start_sinks: StartSinks | None = None) -> None:
        """`caller`: what renacerd's caller gave it, captured at start (launch mode);
        `start_sinks(db_path, run)` starts the sinks that tail the store (from the CLI, since
        sinks read the store and come after this stage)."""
        self.config = config
        self.start_sinks = start_sinks
        self.cmd = list(config.cmd)
        self.caller = caller or CallerSignals.capture()
        self.exe = ""
        if self.cmd:
            try:
                self.exe = resolve_command(self.cmd[0], os.environ)
            except CommandError as e:
                raise SessionError(str(e)) from e
        for pid in config.pids:
            try:
                check_target(pid)
            except TargetError as e:
                raise SessionError(str(e)) from e
        self.db_path = config.db or default_db_path()
        try:
            self.store = Store(self.db_path, create=True)
        except StoreError as e:
            raise SessionError(str(e)) from e
        self.store.mark_stale_runs_incomplete()
        self.run_name = config.run or default_run_name(self.cmd or None)
        if self.store.run_exists(self.run_name):
            raise SessionError(f"run '{escape(self.run_name)}' already exists in "
                               f"{self.db_path}")
        self.owner_uid = os.getuid() if config.owner_uid is None else config.owner_uid

    def _say(self, msg: str) -> None:
        if not self.config.quiet:
            sys.stderr.write(f"renacerd: {msg}\n")

    def run(self) -> int:
        """Attach or launch, trace until done, print the summary; returns the exit status."""
        out = _Outcome()
        child: HeldChild | None = None
        loop = None
        policy = self.config.retention
        try:
            with ExitStack() as stack:
                stack.callback(self._close_store)
                if policy is not None and not policy.empty:
                    from renacerd.store.retention import RetentionLoop

                    loop = RetentionLoop(self.store.path, policy).start()
                    stack.callback(loop.stop)
                child = self._trace(stack, out)
        except _Refused as e:
            sys.stderr.write(f"renacerd: error: {e}\n")
            return 2
        if loop is not None:
            loop.pass_once_logged()  # the run's end
        return self._exit_status(out, child)

    def _trace(self, stack: ExitStack, out: _Outcome) -> HeldChild | None:
        """Set everything up on `stack` (undone in reverse, whatever happens) and trace."""
        c = self.config
        env = dict(os.environ)
        feed, close_feed = self._span_feed(stack, env)
        child = HeldChild(self.exe, self.cmd, env, self.caller) if self.cmd else None
        if child is not None:
            stack.callback(child.abort_unless_released)
        probes = SyscallProbes(follow=c.follow, event_mb=c.ring_mb,
                               detail_mb=c.detail_ring_mb, owner_uid=self.owner_uid)
        try:
            probes.load()
        except ProbeError as e:
            raise _Refused(str(e)) from e
        close_probes = _once(probes.close)
        stack.callback(close_probes)
        try:
            tracer = Tracer(probes, self.store, self.run_name,
                            cmdline=self.cmd or [f"--pid={p}" for p in c.pids],
                            follow=c.follow, owner_uid=self.owner_uid)
        except StoreError as e:  # e.g. another daemon took the run name meanwhile
            raise _Refused(str(e)) from e
        # From here the run exists and is ended whatever happens.
        finish = _once(self._finish, tracer, out)
        stack.callback(finish)
        cuda_src = self._cuda(tracer, out, env)
        close_cuda = _once(cuda_src.close if cuda_src is not None else _nothing)
        stack.callback(close_cuda)
        # Sinks tail the committed store on their own threads: the network never slows capture.
        for sink in self.start_sinks(self.db_path, self.run_name) if self.start_sinks else []:
            stack.callback(sink.stop, drain_s=10)
        # The order of the end (the stack runs these first, last registered first): spans
        # still open are stored, the run ends with its last events, CUDA and then the
        # syscall probes leave the kernel, and only then do the sinks drain what was
        # committed. Registered again here; the first registrations cover a failure above.
        stack.callback(close_probes)
        stack.callback(close_cuda)
        stack.callback(finish)
        stack.callback(close_feed)
        try:
            self._start(tracer, feed, child, out)
            if out.error is None and c.priority == "idle":
                guard = self._guard(probes, cuda_src)
                if guard is not None:
                    guard.attach(tracer)
                    stack.callback(guard.close)  # first: normal priority for the final flush
            if c.ready_fd is not None and not out.gone:
                # Probes attached, the first commit done, the daemon at its priority:
                # `renacerd serve` may ack now.
                os.write(c.ready_fd, b"ready\n")
                os.close(c.ready_fd)
            if out.error is None:
                tracer.run(duration=c.duration)
        except StoreError as e:
            out.status, out.error, out.store_failed = "incomplete", str(e), True
        except BaseException as e:  # never leave probes in the kernel
            out.status, out.error = "incomplete", f"{type(e).__name__}: {e}"
            raise
        return child

    def _span_feed(self, stack: ExitStack, env: dict[str, str]
                   ) -> tuple[SpanFeed | None, Callable[[], None]]:
        """The span server of this run (its socket in the command's environment), closed
        at most once."""
        try:
            feed = SpanFeed.for_session(self.config.socket, launch=bool(self.cmd))
        except SpanFeedError as e:
            raise _Refused(str(e)) from e
        if feed is None:
            return None, _nothing
        close_feed = _once(feed.close)
        stack.callback(close_feed)
        env["RENACER_SOCKET"] = feed.path
        return feed, close_feed

    def _cuda(self, tracer: Tracer, out: _Outcome, env: dict[str, str]) -> CudaSource | None:
        """The CUDA probes of this run; None when they are off or could not load (said)."""
        try:
            cuda_src = CudaSource.for_tracer(tracer, self.config.cuda)
        except ProbeError as e:
            if self.config.cuda.mode == "paths":  # the libraries were asked for by name
                out.status, out.error = "incomplete", str(e)
                raise _Refused(str(e)) from e
            self._say(f"CUDA probes off: {e}")
            return None
        if cuda_src is not None:
            tracer.sources.append(cuda_src)
            if self.cmd:
                cuda_src.preload_for_command([self.exe, *self.cmd[1:]], env)
        return cuda_src

    def _start(self, tracer: Tracer, feed: SpanFeed | None, child: HeldChild | None,
               out: _Outcome) -> None:
        """Feed spans in, then release the held command or attach to the --pid targets."""
        if feed is not None:
            feed.attach(tracer, [child.pid] if child is not None else list(self.config.pids))
        if child is not None:
            tracer.adopt_launched(child.pid)
            err = child.release()
            if err is not None:
                out.error = f"cannot execute '{escape(self.cmd[0])}': {err}"
                tracer._reap_root(block=True)  # it exits 127 at once
        else:
            for pid in self.config.pids:
                try:
                    tracer.attach(pid)
                except psutil.NoSuchProcess:
                    # It exited between the checks and the attach (probes load first).
                    out.status = "incomplete"
                    out.error = f"process {pid} exited before it could be traced"
                    out.gone = True
                    break
        if not out.gone:
            self._say(f"tracing run {escape(self.run_name)} (store {escape(self.db_path)})")
        install_signal_handlers(tracer)

    def _guard(self, probes: SyscallProbes, cuda_src: CudaSource | None) -> PriorityGuard | None:
        """The priority guard watching every ring; None (said) where it cannot run."""
        rings = probes.rings() + (cuda_src.probes.rings() if cuda_src else [])
        try:
            return PriorityGuard([(r.map_fd, r.data_size) for r in rings])
        except OSError as e:
            self._say(f"priority stays normal: {e.strerror or e}")
            return None

    def _finish(self, tracer: Tracer, out: _Outcome) -> None:
        """End the run in the store (a store failure becomes the run's error)."""
        try:
            out.summary = tracer.finish(status=out.status, error=out.error)
            out.error = tracer.final_error or out.error
        except StoreError as e:
            out.error = str(e)

    def _close_store(self) -> None:
        try:
            self.store.close()
        except Exception:
            pass

    def _exit_status(self, out: _Outcome, child: HeldChild | None) -> int:
        """Report the end of the run; the command's exit status in launch mode."""
        summary = out.summary
        if out.error is not None:
            sys.stderr.write(f"renacerd: error: {out.error}\n")
            if summary is None or out.gone or child is not None and summary.exit_status == 127:
                return 2
        if summary is not None:
            self._print_summary(summary)
            if child is not None and summary.exit_status is None:
                self._say(f"detached; command still running as pid {child.pid}")
        if out.store_failed:
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
