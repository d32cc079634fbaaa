"""The tower worker's wire format on real sockets: one ``sendmsg`` per frame
(``send_frame``), the buffered reader (``FrameReader``) and its header cache, against the
plain ``encode`` of the same bytes."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from contracts import tower_wire as wire


def _arrays(rows: int, length: int = 13) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(rows)
    return [
        ("item_seq", rng.integers(0, 40, (rows, length)).astype(np.int64)),
        ("time_lag", rng.random((rows, length), dtype=np.float32)),
    ]


def test_send_frame_is_the_encoded_frame() -> None:
    """sendmsg of the parts puts exactly encode()'s bytes on the stream, for views that are
    not contiguous, 0-d arrays and numpy scalars too."""
    arrays = [
        *_arrays(3),
        ("strided", np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]),
        ("scalar", np.float32(2.5)),
        ("empty", np.zeros((0, 4), np.int64)),
    ]
    a, b = socket.socketpair()
    with a, b:
        wire.send_frame(a, {"op": "t"}, arrays)
        frame = wire.encode({"op": "t"}, arrays)
        assert b.recv(len(frame) + 10) == frame
        header, got = wire.FrameReader(_feed(frame)).read()
        assert header["op"] == "t"
        for name, array in arrays:
            assert np.array_equal(got[name], np.asarray(array)), name
    with pytest.raises(ValueError, match="not allowed"):
        wire.frame_parts({}, [("x", np.zeros(2, ">i8"))])  # big-endian: refused as before


def _feed(data: bytes) -> socket.socket:
    a, b = socket.socketpair()
    a.sendall(data)
    a.close()
    return b


def test_reader_keeps_the_next_frames_bytes() -> None:
    """Frames sent back to back (read in one recv) come out one by one, intact."""
    frames = [({"n": n}, _arrays(n + 1)) for n in range(4)]
    data = b"".join(wire.encode(h, a) for h, a in frames) + wire.encode({"n": "end"})
    sock = _feed(data)
    reader = wire.FrameReader(sock, buffer_bytes=1024)  # small: compaction is exercised
    for header, arrays in frames:
        got_header, got = reader.read()
        assert got_header["n"] == header["n"]
        for name, array in arrays:
            assert np.array_equal(got[name], array)
    assert reader.read()[0]["n"] == "end"
    with pytest.raises(wire.PeerClosed, match="between frames"):
        reader.read()
    sock.close()


def test_reader_reads_payloads_larger_than_its_buffer() -> None:
    """A payload beyond the buffer gets its own; a partial sendmsg is finished by sendall
    (the socket's buffer is smaller than the frame); the next frame is still read."""
    big = [("x", np.arange(600_000, dtype=np.int64))]  # 4.8 MB
    a, b = socket.socketpair()
    with a, b:
        sender = threading.Thread(
            target=lambda: [wire.send_frame(a, {"n": 1}, big), wire.send_frame(a, {"n": 2})]
        )
        sender.start()
        reader = wire.FrameReader(b)
        header, got = reader.read()
        assert header["n"] == 1 and np.array_equal(got["x"], big[0][1])
        assert reader.read()[0]["n"] == 2
        sender.join()


def test_header_cache_returns_fresh_headers_and_still_checks_lengths() -> None:
    frame = wire.encode({"op": "embed", "model_version": "v"}, _arrays(2))
    sock = _feed(frame * 3)
    reader = wire.FrameReader(sock, cache_headers=True)
    first, _ = reader.read()
    first["op"] = "changed"  # a caller's change must not reach the next frame's header
    second, got = reader.read()
    assert second["op"] == "embed" and got["item_seq"].shape == (2, 13)
    reader.read()
    sock.close()
    # The same header bytes with another payload length: checked, not taken from the cache.
    head_len = wire.PREFIX.unpack(frame[: wire.PREFIX.size])[1]
    header = frame[wire.PREFIX.size : wire.PREFIX.size + head_len]
    payload = frame[wire.PREFIX.size + head_len :]
    bad = wire.PREFIX.pack(wire.MAGIC, head_len, len(payload) + 8) + header + payload + b"\0" * 8
    sock = _feed(frame + bad)
    reader = wire.FrameReader(sock, cache_headers=True)
    reader.read()
    with pytest.raises(wire.FrameError, match="payload has"):
        reader.read()
    sock.close()


def test_client_header_cache_encodes_the_same_bytes() -> None:
    cache: dict = {}
    header = {"op": "embed", "model_version": "v"}
    for rows in (1, 2, 1):
        parts, total = wire.frame_parts(header, _arrays(rows), cache)
        assert b"".join(parts) == wire.encode(header, _arrays(rows)) and total == sum(
            memoryview(p).nbytes for p in parts
        )
    assert len(cache) == 2  # one per batch size
    # Unhashable header values are encoded, not cached.
    parts, _ = wire.frame_parts({"op": "x", "list": [1, 2]}, [], cache)
    assert len(cache) == 2 and b'"list":[1,2]' in parts[0]


# --------------------------------------------------------------------------- spinning
# FrameReader(spin_us=...) busy-polls before it blocks.  What must not change: the frames
# read, a socket timeout (the client's deadline) and a closed peer.  No time is asserted:
# a spin that ignored the deadline or the peer would fail with the wrong error, or hang.


def _send_later(sock: socket.socket, chunks: list[bytes], pause_s: float) -> threading.Thread:
    """Send ``chunks`` from a thread, ``pause_s`` before each (so that the reader is
    waiting: in the spin, or past it when the pause is longer than the spin)."""

    def run() -> None:
        for chunk in chunks:
            time.sleep(pause_s)
            sock.sendall(chunk)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("timeout_s", [None, 30.0])
def test_spinning_reads_the_same_frames(timeout_s: float | None) -> None:
    """Spin off, spin long (the bytes land while it polls) and spin short (they land after
    it: the blocking recv takes them): the same frames, also when a frame arrives in parts;
    the socket's timeout is left as it was."""
    frames = [({"n": n}, _arrays(n + 1)) for n in range(3)]
    data = [wire.encode(h, a) for h, a in frames]
    # Each frame's first 5 bytes alone, then the rest, then the next frame whole.
    chunks = [data[0][:5], data[0][5:], data[1], data[2]]
    results = []
    for spin_us in (0, 60_000_000, 500):
        a, b = socket.socketpair()
        with a, b:
            b.settimeout(timeout_s)
            reader = wire.FrameReader(b, spin_us=spin_us)
            sender = _send_later(a, chunks, 0.02)
            got = [reader.read() for _ in frames]
            sender.join()
            assert b.gettimeout() == timeout_s
        results.append(got)
    for got in results:
        for (header, arrays), (got_header, got_arrays) in zip(frames, got, strict=True):
            assert got_header["n"] == header["n"]
            for name, array in arrays:
                assert np.array_equal(got_arrays[name], array)


def test_a_deadline_fires_while_spinning() -> None:
    """A spin far longer than the socket's timeout: the read times out as without spinning
    (TimeoutError, what the client turns into a WorkerError), and the timeout is intact."""
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(0.2)
        reader = wire.FrameReader(b, spin_us=600_000_000)
        with pytest.raises(TimeoutError):
            reader.read()
        assert b.gettimeout() == 0.2
        # The next frame still reads (the stream was not consumed by the spin).
        a.sendall(wire.encode({"n": 1}))
        assert reader.read()[0]["n"] == 1


@pytest.mark.parametrize("timeout_s", [None, 20.0])
def test_a_closed_peer_is_seen_while_spinning(timeout_s: float | None) -> None:
    """The peer closes during a 600 s spin: PeerClosed (had the spin missed it, the read
    would end in a TimeoutError after 20 s, or hang without a timeout)."""
    a, b = socket.socketpair()
    with b:
        b.settimeout(timeout_s)
        reader = wire.FrameReader(b, spin_us=600_000_000)
        a.sendall(wire.encode({"n": 1}))
        assert reader.read()[0]["n"] == 1  # what came before the close is read
        closer = threading.Thread(target=lambda: (time.sleep(0.05), a.close()))
        closer.start()
        with pytest.raises(wire.PeerClosed, match="between frames"):
            reader.read()
        closer.join()


def test_one_thread_spins_the_others_block() -> None:
    """Two readers waiting at once (one holds the process's spin token, the other blocks
    as without spinning): both get their frames."""
    pairs = [socket.socketpair() for _ in range(2)]
    got: dict[int, int] = {}

    def read(index: int) -> None:
        reader = wire.FrameReader(pairs[index][1], spin_us=60_000_000)
        got[index] = reader.read()[0]["n"]

    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.05)
    for index, (a, _) in enumerate(pairs):
        a.sendall(wire.encode({"n": index}))
    for thread in threads:
        thread.join()
    assert got == {0: 0, 1: 1}
    for a, b in pairs:
        a.close()
        b.close()
