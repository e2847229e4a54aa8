"""The shared-memory span ring: both ends, wrap-around, full rings, a killed client, and hostile
rings the daemon must refuse without harm to anyone else."""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import orjson
import pytest

from renacerd.client import connection, protocol
from renacerd.client import core as client
from renacerd.client import ring as client_ring
from renacerd.client.core import experiment_span
from renacerd.client.protocol import (
    RING_HEADER,
    RING_MAGIC,
    RING_MIN,
    W_DROPPED,
    W_HEAD,
    W_MAGIC,
    W_SIZE,
    Hello,
    ProtocolError,
    Ring,
    SpanEnd,
    SpanStart,
    encode,
)
from renacerd.serve import span_ring
from renacerd.serve.span_ring import RingReader
from tests.conftest import RawPeer, burst_into_backlog, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_ring():
    """Clients connect with the smallest ring, so a few hundred spans wrap it."""
    c = client._client
    old = c.rsize
    c.rsize = RING_MIN
    yield RING_MIN
    c.rsize = old


def test_frames_cross_many_wraps_in_order(listener, small_ring):
    path, sock = listener
    client.configure(socket=path)
    peer = None
    dropped = client.stats()["dropped"]
    try:
        names = []
        spans = []
        for i in range(3000):
            # sizes that vary, so records end at every alignment before the wrap
            name = "s" * (1 + i % 97)
            with experiment_span(name, step=i) as span:
                pass
            names.append(name)
            spans.append(span.span_id)
            if i == 0:
                peer = RawPeer(sock)
            if i % 50 == 49:
                assert len(frames := peer.read()) > 0
                msgs = [protocol.decode(f) for f in frames]
                names_seen = [m.name for m in msgs if isinstance(m, SpanStart)]
                ends_seen = [m.span_id for m in msgs if isinstance(m, SpanEnd)]
                assert names_seen == names and ends_seen == spans
                names, spans = [], []
        assert peer.ring.tail > 10 * small_ring  # wrapped many times
        assert client.stats()["dropped"] == dropped
    finally:
        if peer is not None:
            peer.close()


def test_full_ring_backlog_then_drops_and_the_count_comes_through_the_ring(listener,
                                                                          small_ring):
    path, sock = listener
    client.configure(socket=path)
    base = client.stats()
    n = 0
    while client.stats()["dropped"] == base["dropped"] and n < 100_000:
        with experiment_span("flood", metrics={"x": 1.0}):
            pass
        n += 1
    stats = client.stats()
    assert stats["queued"] >= connection.BACKLOG and stats["connected"] and stats["ring"]
    t0 = time.perf_counter()
    for _ in range(100):
        with experiment_span("more"):
            pass
    assert time.perf_counter() - t0 < 0.5  # never blocks on a full ring
    peer = RawPeer(sock)
    try:
        # the flusher thread moves the backlog in as the reads make room
        frames = peer.read_until(lambda _: client.stats()["queued"] == 0)
        with experiment_span("after") as after:
            pass
        frames += peer.read()
        msgs = [protocol.decode(f) for f in frames]
        starts = {m.span_id for m in msgs if isinstance(m, SpanStart)}
        ends = {m.span_id for m in msgs if isinstance(m, SpanEnd)}
        final = client.stats()
        assert isinstance(msgs[0], Hello) and after.span_id in starts
        assert final["queued"] == 0
        assert len(msgs) == final["sent"] - base["sent"] - 1  # the ring message is not listed
        assert peer.ring.dropped() == final["dropped"] - base["dropped"] > 0
        # every span the daemon saw start was also ended: no span left open there
        assert starts == ends
        assert wait_for(lambda: client._client.flusher is None)
    finally:
        peer.close()


def test_spans_written_before_a_sigkill_are_read(span_daemon):
    # The ring outlives the process: the daemon reads it to the end when the socket closes.
    server, book = span_daemon
    code = textwrap.dedent(f"""
        import os, signal
        from renacerd.client.core import configure, experiment_span, stats
        configure(socket={server.address!r})
        for i in range(500):
            with experiment_span("step", step=i):
                pass
        outer = experiment_span("dies-inside")
        outer.__enter__()
        assert stats()["ring"]
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ,
                          PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert wait_for(lambda: book.counts()["spans_started"] == 501
                    and server.stats["open"] == 0)
    recs = book.drain()
    steps = sorted(int(r.attributes()["experiment.step"]) for r in recs
                   if r.span_name == "step")
    assert steps == list(range(500))
    (dead,) = [r for r in recs if r.span_name == "dies-inside"]
    assert dead.status_code.name == "ERROR"
    assert server.stats["rings"] == 1 and server.stats["protocol_errors"] == 0


def test_ring_survives_fork_child_uses_its_own(span_daemon):
    server, book = span_daemon
    client.configure(socket=server.address)
    try:
        with experiment_span("parent-1"):
            pass
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                with experiment_span("child"):
                    pass
                code = 0 if client.stats()["ring"] else 2
            finally:
                os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        with experiment_span("parent-2"):
            pass
        assert wait_for(lambda: book.counts()["spans_ended"] == 3)
        by_name = {r.span_name: r.process_id for r in book.drain()}
        assert by_name == {"parent-1": os.getpid(), "child": pid,
                           "parent-2": os.getpid()}
        assert server.stats["rings"] == 2 and server.stats["protocol_errors"] == 0
    finally:
        client.configure(socket="/nonexistent/gone.sock")


# --- hostile rings -------------------------------------------------------------------------


def make_ring(size=RING_MIN, seals=fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW, magic=RING_MAGIC):
    fd = os.memfd_create("t", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, RING_HEADER + size)
    mm = mmap.mmap(fd, RING_HEADER + size)
    words = memoryview(mm).cast("Q")
    words[W_MAGIC] = magic
    words[W_SIZE] = size
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd, mm, words


def hand_over(path, fd, size=RING_MIN, extra=()):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    sock.send(encode(Hello()))
    sock.sendmsg([encode(Ring(size))],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd, *extra]))])
    return sock


def closed(sock, timeout=5.0):
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def good_client_still_served(srv, book):
    client.configure(socket=srv.address)
    before = book.counts()["spans_ended"]
    with experiment_span("good"):
        pass
    return wait_for(lambda: book.counts()["spans_ended"] == before + 1)


@pytest.mark.parametrize("case", ["unsealed", "pipe", "too small", "bad magic", "two fds",
                                  "fd on hello", "second ring"])
def test_bad_ring_hand_over_closes_only_that_connection(span_daemon, case):
    srv, book = span_daemon
    if case == "pipe":
        r, w = os.pipe()
        os.close(w)
        fd, extra = r, ()
    else:
        fd, mm, words = make_ring(seals=0 if case == "unsealed" else
                                  fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW,
                                  magic=0 if case == "bad magic" else RING_MAGIC)
        extra = (os.dup(fd),) if case == "two fds" else ()
    size = RING_MIN * 2 if case == "too small" else RING_MIN
    if case == "fd on hello":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(srv.address)
        sock.sendmsg([encode(Hello())],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    else:
        sock = hand_over(srv.address, fd, size, extra)
        if case == "second ring":
            fd2, _, _ = make_ring()
            sock.sendmsg([encode(Ring(RING_MIN))],
                         [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd2]))])
            os.close(fd2)
    os.close(fd)
    for e in extra:
        os.close(e)
    assert closed(sock)
    assert srv.stats["protocol_errors"] == 1
    assert good_client_still_served(srv, book)
    sock.close()


def write_record(mm, words, head, seq, payload, length=None):
    at = RING_HEADER + head
    mm[at + 16:at + 16 + len(payload)] = payload
    words[at // 8] = len(payload) if length is None else length
    words[at // 8 + 1] = seq
    end = head + protocol.ring_record_size(len(payload))
    words[W_HEAD] = end
    return end


@pytest.mark.parametrize("case", ["garbage payload", "length past the end", "head too far"])
def test_hostile_ring_contents_close_only_that_connection(span_daemon, case):
    srv, book = span_daemon
    fd, mm, words = make_ring()
    sock = hand_over(srv.address, fd)
    os.close(fd)
    if case == "garbage payload":
        write_record(mm, words, 0, 1, b"\x00garbage\xff")
    elif case == "length past the end":
        write_record(mm, words, 0, 1, b"{}", length=RING_MIN)
    else:
        words[W_HEAD] = RING_MIN * 3
    assert closed(sock)
    assert srv.stats["protocol_errors"] == 1
    assert good_client_still_served(srv, book)
    sock.close()


def test_a_record_that_never_becomes_valid_closes_after_the_stall_limit(span_daemon, monkeypatch):
    srv, book = span_daemon
    monkeypatch.setattr(span_ring, "STALL_S", 0.2)
    fd, mm, words = make_ring()
    sock = hand_over(srv.address, fd)
    os.close(fd)
    words[W_HEAD] = 64  # published, but the record there never gets its number
    t0 = time.monotonic()
    assert closed(sock)
    assert 0.2 <= time.monotonic() - t0 < 3
    assert srv.stats["protocol_errors"] == 1


def test_reader_counts_drops_and_waits_for_numbers(sock_dir):
    fd, mm, words = make_ring()
    reader = RingReader(os.dup(fd), RING_MIN, checked=False)
    os.close(fd)
    start = orjson.dumps(["e", "00f067aa0ba902b7", 1, 2, 3])
    end = write_record(mm, words, 0, 1, start)
    # published but its number is not there yet: not read, and nothing consumed
    write_record(mm, words, end, 0, start)
    assert reader.read(10) == [start]
    assert reader.tail == end and reader.seq == 1
    words[(RING_HEADER + end) // 8 + 1] = 2
    assert reader.read(10) == [start]
    words[W_DROPPED] = 5
    assert reader.dropped() == 5 and reader.dropped() == 0
    words[W_DROPPED] = 3  # a count that goes back is not believed
    assert reader.dropped() == 0
    reader.close()


def test_checked_records_need_their_crc(sock_dir):
    # Where CPUs reorder stores the writer adds a CRC; a record whose CRC does not match
    # (part of its stores not visible yet) is read again later, not taken.
    import zlib

    fd, mm, words = make_ring()
    reader = RingReader(os.dup(fd), RING_MIN, checked=True)
    os.close(fd)
    payload = orjson.dumps(["e", "00f067aa0ba902b7", 1, 2, 3])
    write_record(mm, words, 0, 1, payload, length=len(payload) | (12345 << 32))
    assert reader.read(10) == [] and reader.tail == 0
    words[RING_HEADER // 8] = len(payload) | (zlib.crc32(payload, 1) << 32)
    assert reader.read(10) == [payload]
    reader.close()


def test_flusher_moves_the_backlog_into_the_ring_as_it_drains(listener, small_ring):
    path, sock = listener
    client.configure(socket=path)
    base = client.stats()
    n = burst_into_backlog(100_000)
    assert 0 < client.stats()["queued"] < connection.BACKLOG
    peer = RawPeer(sock)
    try:
        frames = peer.read_until(lambda got: client.stats()["queued"] == 0 and len(got) == (
            client.stats()["sent"] - base["sent"] - 1))
        msgs = [protocol.decode(f) for f in frames]
        starts = [m.span_id for m in msgs if isinstance(m, SpanStart)]
        ends = [m.span_id for m in msgs if isinstance(m, SpanEnd)]
        assert len(starts) == n + 10 and starts == ends
        assert client.stats()["dropped"] == base["dropped"]
        assert wait_for(lambda: client._client.flusher is None)
        assert not [t for t in threading.enumerate() if t.name == "renacerd-client-flush"]
    finally:
        peer.close()


def test_ring_off_by_environment(sock_dir, listener):
    path, sock = listener
    code = textwrap.dedent(f"""
        from renacerd.client.core import configure, experiment_span, stats
        configure(socket={path!r})
        with experiment_span("x"):
            pass
        print(stats()["ring"], stats()["sent"])
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=dict(
        os.environ, PYTHONPATH=str(ROOT), RENACER_RING="0"), capture_output=True, text=True,
        timeout=60)
    assert proc.stdout.split() == ["False", "3"], proc.stderr
    peer = RawPeer(sock)
    assert [type(m) for m in peer.messages()] == [Hello, SpanStart, SpanEnd]
    assert peer.ring is None
    peer.close()


def test_reader_refuses_before_mapping():
    with pytest.raises(ProtocolError, match="sealable memfd"):
        r, w = os.pipe()
        os.close(w)
        RingReader(r, RING_MIN)


def test_crc_records_end_to_end(span_daemon, small_ring, monkeypatch):
    # What a weakly ordered CPU (arm64) runs: the client adds a CRC to every record and the
    # daemon checks it; forced here on x86, across wraps of a small ring.
    monkeypatch.setattr(client_ring, "CRC", True)
    server, book = span_daemon
    client.configure(socket=server.address)
    try:
        for i in range(600):
            with experiment_span("step", step=i, metrics={"m": i / 7}):
                pass
            if i % 100 == 99:
                assert wait_for(lambda n=i + 1: book.counts()["spans_ended"] == n)
        recs = book.drain()
        assert sorted(int(r.attributes()["experiment.step"]) for r in recs) == list(
            range(600))
        assert server.stats["rings"] == 1 and server.stats["protocol_errors"] == 0
    finally:
        client.configure(socket="/nonexistent/gone.sock")


def test_close_is_seen_behind_an_unread_reply(listener):
    # The once-a-second look at the socket must see the daemon's close even when a reply
    # nobody read (a late ack) sits in front of it.
    path, sock = listener
    client.configure(socket=path)
    with experiment_span("first"):
        pass
    peer = RawPeer(sock)
    assert [type(m) for m in peer.messages()] == [Hello, SpanStart, SpanEnd]
    peer.conn.send(encode(protocol.Ack(7, True)))
    peer.close()
    client._client.wall_due_ns = 0  # the look is due
    with experiment_span("second") as second:
        pass
    assert not client.stats()["connected"] and not second.connected


@pytest.mark.parametrize("case", ["write sealed", "read-only descriptor"])
def test_ring_the_daemon_cannot_map_writable_is_refused(span_daemon, case):
    srv, book = span_daemon
    if case == "write sealed":
        fd, mm, words = make_ring()
        del words
        mm.close()
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        send = fd
    else:
        fd, mm, words = make_ring()
        send = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    sock = hand_over(srv.address, send)
    os.close(fd)
    if send != fd:
        os.close(send)
    assert closed(sock)
    assert srv.stats["protocol_errors"] == 1
    assert good_client_still_served(srv, book)  # the server thread lives on
    sock.close()


def test_descriptors_on_an_empty_message_are_not_leaked(span_daemon):
    srv, book = span_daemon
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        fd, mm, words = make_ring()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(srv.address)
        r, w = os.pipe()  # not a memfd: closed on a thread of its own (it could be FUSE)
        sock.sendmsg([b""], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                              array.array("i", [fd] * 3 + [r]))])
        os.close(fd)
        os.close(r)
        os.close(w)
        del words
        mm.close()
        assert closed(sock)
        sock.close()
    assert wait_for(lambda: srv.stats["open"] == 0)
    assert wait_for(lambda: len(os.listdir("/proc/self/fd")) <= before + 1)


def test_drain_at_close_stops_at_the_head_of_that_moment(sock_dir):
    fd, mm, words = make_ring()
    reader = RingReader(os.dup(fd), RING_MIN, checked=False)
    os.close(fd)
    frame = orjson.dumps(["e", "00f067aa0ba902b7", 1, 2, 3])
    end = write_record(mm, words, 0, 1, frame)
    until = reader.head
    write_record(mm, words, end, 2, frame)  # written after the close: not this drain's
    assert reader.read(100, until) == [frame]
    assert reader.read(100) == [frame]
    reader.close()


def test_an_oversized_frame_is_dropped_and_counted_not_sent(span_daemon):
    server, book = span_daemon
    client.configure(socket=server.address)
    try:
        with experiment_span("small"):
            pass
        dropped = client.stats()["dropped"]
        # 256 names of 128 control characters: ~190 kB of JSON escapes
        huge = {chr(1) * 126 + chr(i // 16 + 1) + chr(i % 16 + 1): 1.0 for i in range(256)}
        assert len(huge) == 256
        with experiment_span("huge", metrics=huge) as big:
            pass
        with experiment_span("after"):
            pass
        assert not big.connected
        assert client.stats()["dropped"] == dropped + 1
        assert wait_for(lambda: book.counts()["spans_ended"] == 2)
        assert server.stats["protocol_errors"] == 0 and server.stats["open"] == 1
    finally:
        client.configure(socket="/nonexistent/gone.sock")


@pytest.mark.parametrize("crc", [False, True])
def test_the_inlined_span_write_puts_the_bytes_ringwriter_puts(listener, small_ring, crc,
                                                               monkeypatch):
    # Span.__enter__ and __exit__ inline RingWriter.write's common case for speed: the ring
    # they leave must be the one RingWriter.write leaves for the same frames.
    monkeypatch.setattr(client_ring, "CRC", crc)
    calls = []
    write = client_ring.RingWriter.write
    monkeypatch.setattr(client_ring.RingWriter, "write",
                        lambda self, payload: calls.append(len(payload)) or write(self, payload))
    path, sock = listener
    client.configure(socket=path)
    for i in range(60):
        with experiment_span("s" * (1 + i % 37), step=i, metrics={"m": i / 3}):
            pass
    with pytest.raises(KeyError), experiment_span("fails"):
        raise KeyError("k")
    ring = client._client.ring
    assert ring is not None and ring.crc is crc
    data = bytes(ring.mm[RING_HEADER:RING_HEADER + small_ring])
    head, seq = ring.head, ring.seq
    peer = RawPeer(sock)
    try:
        frames = peer.read()
    finally:
        peer.close()
    assert isinstance(protocol.decode(frames[0]), Hello) and len(frames) == 1 + 122
    # Only the first frame took RingWriter.write (the limit is 0 until it looks at the tail).
    assert len(calls) == 1 and seq == 122
    ref, fd = client_ring.RingWriter.create(small_ring)
    os.close(fd)
    try:
        assert all(ref.write(f) for f in frames[1:])
        assert (ref.head, ref.seq, ref.words[W_HEAD]) == (head, seq, head)
        assert bytes(ref.mm[RING_HEADER:RING_HEADER + small_ring]) == data
    finally:
        ref.close()
