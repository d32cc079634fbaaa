"""The tower worker's wire format: length-prefixed frames over a local stream socket.

A GPU deployment runs the user tower in a separate process (``worker.server``: torch
and the fused Triton kernel) because the service must not import torch; the service's
client is ``service.remote_tower``.  Both sides use this module (numpy and the standard
library only), which is why it lives in the contracts, the lowest layer: the worker
(``worker/``, above the service) and the service's client import it from here, and neither
imports the other's side for the bytes.  The framed reader and its busy-polling belong
with the layout because both ends must wait for a frame the same way (the spin setting is
one value shared by the service and the worker, see ``default_spin_us``).

One frame::

    b"T2TW"                     4 bytes, magic (a stray client or a desynchronised stream
                                is refused at the first frame, not parsed as lengths)
    header_len                  uint32 big-endian, <= MAX_HEADER_BYTES
    payload_len                 uint64 big-endian, <= the reader's max_payload
    header                      header_len bytes of UTF-8 JSON, an object
    payload                     payload_len bytes: the arrays of header["arrays"], in order,
                                C-contiguous, little-endian

``header["arrays"]`` is a list of ``{"name", "dtype", "shape"}``; the byte counts must add up
to ``payload_len`` exactly.  Only the dtypes of ``ALLOWED_DTYPES`` are accepted and nothing
is ever unpickled.

Requests (``op``):

* ``health``: no arrays.  Answer: ``{"ok": true, "versions": [...], "device", "path", ...}``.
* ``load``: ``{"artifacts": DIR, "model_version": V}``: load that export beside the ones
  held (for the service's hot swap).  Answer: ``{"ok": true, "versions": [...]}``, or an
  error when the directory's version is not ``V`` or the worker may not read it.
* ``embed``: ``{"model_version": V}`` + arrays ``item_seq`` int64 ``[B, L]`` and
  ``time_lag`` float32 ``[B, L]`` (``contracts.tower``; the noise is the manifest's fixed
  draw, which the worker makes itself).  Answer: ``{"ok": true, "model_version": V,
  "compute_ms": ...}`` + array ``user_embedding`` float32 ``[B, d]``.

An answer with ``"ok": false`` carries ``"error"`` (a short code: ``bad_frame``,
``bad_request``, ``version_mismatch``, ``load_failed``, ``internal``) and ``"detail"``.
After ``bad_frame`` the worker closes the connection (the stream cannot be trusted).

Sending and reading: :func:`send_frame` (one ``sendmsg`` of the header and the arrays' own
memory) and :class:`FrameReader` (a connection's buffered reader) are what the worker and
the service's client use; :func:`encode` gives the same bytes as one ``bytes`` object.

Waiting for a frame: a :class:`FrameReader` with ``spin_us`` > 0 first busy-polls the
socket for up to that long, then blocks as before (see ``FrameReader._spin``: why, and
how a deadline and a closed peer are still honoured).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import select
import socket
import struct
import termios
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

MAGIC = b"T2TW"
PREFIX = struct.Struct(">4sIQ")
MAX_HEADER_BYTES = 64 * 1024
# 256 rows x L = 200 x (8 + 4) bytes is 0.6 MB; 64 MB leaves room and bounds a bad length.
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024
ALLOWED_DTYPES = {"int64": np.dtype("<i8"), "float32": np.dtype("<f4")}
# dtype -> its wire name by dict lookup: str(array.dtype) costs ~4 us per array, a sizeable
# part of a B = 1 frame's encode.  Only these exact (little-endian) dtypes are keys, as
# str() refused ">i8" before.
_WIRE_NAMES = {dtype: name for name, dtype in ALLOWED_DTYPES.items()}
# One encoder object: json.dumps(separators=...) builds a new one per call.
_JSON = json.JSONEncoder(separators=(",", ":"))
# A connection's receive buffer (FrameReader): a B = 256 frame of ML-1M shapes (51 KB in,
# 64 KB out) arrives in one recv; larger payloads are read into their own buffer.
READ_BUFFER_BYTES = 256 * 1024

# Busy-polling before a blocking receive (FrameReader spin_us), the default of both sides
# (the service's TOWER_WORKER_SPIN_US, the worker's --spin-us; Settings says why 3000), on
# a machine where this process may use at least SPIN_MIN_CPUS cores (default_spin_us).
DEFAULT_SPIN_US = 3000
# Why a floor: a poller is a runnable thread that needs a core of its own.  On the shared
# 2-core box (client, worker and other load) spinning made the no-op round trip's p99 up
# to 20x worse (0.28 -> 4.9-5.4 ms; docs/operations.md): the process that had work to do
# waited for a time slice behind a poller.  A GPU box has cores to spare.
SPIN_MIN_CPUS = 4
# At most one thread of a process spins at a time: it bounds the CPU burnt to one core per
# process (the service's batcher threads, the worker's connection threads), and spinners
# would otherwise compete for the GIL with each other.  A thread that finds the token taken
# blocks at once, as without spinning.
_SPIN_TOKEN = threading.Lock()
# Spin iterations between two looks at the clock and at poll() (a closed peer leaves
# FIONREAD at 0): ~2 us per iteration, so ~30 us between looks.
_SPIN_CHECK_EVERY = 16
_NOTHING_QUEUED = bytes(4)  # FIONREAD's int when nothing is queued

OP_HEALTH = "health"
OP_LOAD = "load"
OP_EMBED = "embed"


def usable_cpus() -> float:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a
    container's CPU limit leaves the affinity at every core of the node, and a poller
    that eats the quota gets the whole container throttled)."""
    try:
        cpus: float = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity call on this platform
        cpus = os.cpu_count() or 1
    for quota_file, period_file in (
        ("/sys/fs/cgroup/cpu.max", None),  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    ):
        try:
            with open(quota_file) as handle:
                fields = handle.read().split()
            if period_file is not None:
                with open(period_file) as handle:
                    fields += handle.read().split()
            if fields[0] not in ("max", "-1") and int(fields[1]) > 0:
                cpus = min(cpus, int(fields[0]) / int(fields[1]))
            break
        except (OSError, ValueError, IndexError):
            continue
    return cpus


def default_spin_us() -> int:
    """DEFAULT_SPIN_US where this process may use SPIN_MIN_CPUS cores or more, else 0."""
    return DEFAULT_SPIN_US if usable_cpus() >= SPIN_MIN_CPUS else 0


class FrameError(ValueError):
    """A frame that breaks the format (the connection is not usable afterwards)."""


class PeerClosed(ConnectionError):
    """The other side closed the connection (cleanly, between frames, or mid-frame)."""


Buffer = bytes | bytearray | memoryview | np.ndarray
# Entries of a header cache (frame_parts' head_cache, FrameReader's cache_headers): one per
# distinct header, e.g. (model version, batch size); emptied when full.
HEADER_CACHE_SIZE = 256


def frame_parts(
    header: dict[str, Any],
    arrays: Sequence[tuple[str, np.ndarray]] = (),
    head_cache: dict[Any, bytes] | None = None,
) -> tuple[list[Buffer], int]:
    """One frame as a list of buffers for a single ``sendmsg`` (prefix + header, then each
    array's own memory: no copy of contiguous arrays) and its byte count.

    ``head_cache``: a dict kept by the caller, (header items, array specs) -> the encoded
    prefix + header, for a sender whose headers repeat (the client's embed requests: one
    per version and batch size); the JSON encode is then skipped."""
    datas: list[np.ndarray] = []
    keys: list[tuple[str, str, tuple[int, ...]]] = []
    payload_len = 0
    for name, array in arrays:
        dtype_name = _WIRE_NAMES.get(array.dtype)
        if dtype_name is None:
            raise ValueError(f"array {name}: dtype {array.dtype} is not allowed on the wire")
        data = array
        if not (isinstance(data, np.ndarray) and data.flags.c_contiguous):
            # np.require keeps 0-d arrays 0-d (ascontiguousarray would make them 1-d).
            data = np.require(array, dtype=ALLOWED_DTYPES[dtype_name], requirements="C")
        keys.append((name, dtype_name, data.shape))
        datas.append(data)
        payload_len += data.nbytes
    key: Any = None
    first = None
    if head_cache is not None:
        try:
            key = (tuple(header.items()), tuple(keys))
            first = head_cache.get(key)
        except TypeError:  # an unhashable header value: not cached
            key = None
    if first is None:
        specs = [{"name": n, "dtype": d, "shape": list(shape)} for n, d, shape in keys]
        head = _JSON.encode({**header, "arrays": specs}).encode()
        if len(head) > MAX_HEADER_BYTES:
            raise ValueError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
        first = PREFIX.pack(MAGIC, len(head), payload_len) + head
        if key is not None and head_cache is not None:
            if len(head_cache) >= HEADER_CACHE_SIZE:
                head_cache.clear()
            head_cache[key] = first
    parts: list[Buffer] = [first]
    parts += [data for data in datas if data.nbytes]
    return parts, len(first) + payload_len


def encode(header: dict[str, Any], arrays: Sequence[tuple[str, np.ndarray]] = ()) -> bytes:
    """One frame: ``header`` (``"arrays"`` is filled in) and the arrays' bytes."""
    parts, _ = frame_parts(header, arrays)
    return b"".join(parts)


def send_parts(sock: socket.socket, parts: list[Buffer], total: int) -> None:
    """Send a frame of :func:`frame_parts` with one ``sendmsg`` (one syscall, no joined
    copy); the rare partial send (a payload larger than the socket's buffer) is finished
    with ``sendall``."""
    sent = sock.sendmsg(parts)
    if sent < total:
        sock.sendall(memoryview(b"".join(parts))[sent:])


def send_frame(
    sock: socket.socket, header: dict[str, Any], arrays: Sequence[tuple[str, np.ndarray]] = ()
) -> None:
    send_parts(sock, *frame_parts(header, arrays))


def _check_prefix(magic: bytes, head_len: int, payload_len: int, max_payload: int) -> None:
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}")
    if head_len > MAX_HEADER_BYTES:
        raise FrameError(f"header of {head_len} bytes exceeds {MAX_HEADER_BYTES}")
    if payload_len > max_payload:
        raise FrameError(f"payload of {payload_len} bytes exceeds {max_payload}")


def _parse_header(
    head: bytes, payload_len: int
) -> tuple[dict[str, Any], list[tuple[str, np.dtype, tuple[int, ...], int]]]:
    """The header object and its arrays' layout, every spec (and the byte total) checked
    before any payload byte is used."""
    try:
        header = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"header is not UTF-8 JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise FrameError("header is not a JSON object")
    specs = header.get("arrays", [])
    if not isinstance(specs, list):
        raise FrameError("header arrays is not a list")
    layout: list[tuple[str, np.dtype, tuple[int, ...], int]] = []
    total = 0
    for spec in specs:
        if not isinstance(spec, dict):
            raise FrameError("array spec is not an object")
        name, dtype_name, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
        if not isinstance(name, str) or dtype_name not in ALLOWED_DTYPES:
            raise FrameError(f"array spec {spec!r}: bad name or dtype")
        # type(n) is int: bools (an int subclass) and floats are refused.
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(type(n) is int and n >= 0 for n in shape)
        ):
            raise FrameError(f"array {name}: bad shape {shape!r}")
        dtype = ALLOWED_DTYPES[dtype_name]
        size = math.prod(shape) * dtype.itemsize
        total += size
        layout.append((name, dtype, tuple(shape), size))
    if total != payload_len:
        raise FrameError(f"arrays need {total} bytes, payload has {payload_len}")
    return header, layout


def _arrays(
    payload: bytes, layout: list[tuple[str, np.dtype, tuple[int, ...], int]]
) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for name, dtype, shape, size in layout:
        if name in arrays:
            raise FrameError(f"array {name} sent twice")
        arrays[name] = np.frombuffer(payload, dtype=dtype, count=size // dtype.itemsize,
                                     offset=offset).reshape(shape)  # fmt: skip
        offset += size
    return arrays


class FrameReader:
    """Frames of one connection, read through a receive buffer: a frame that fits arrives
    with one ``recv_into`` (instead of one per part), and bytes of a following frame that
    came with it are kept for the next :meth:`read`.

    Why: at B = 1 the worker's round trip was dominated by per-frame Python and syscall
    work, not by the bytes (docs/operations.md, "Overhead of the socket").  The arrays
    returned own their bytes (a copy of the payload), so the buffer can be reused at once.
    """

    def __init__(
        self,
        sock: socket.socket,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        buffer_bytes: int = READ_BUFFER_BYTES,
        cache_headers: bool = False,
        spin_us: int = 0,
    ) -> None:
        self.sock = sock
        self.max_payload = max_payload
        # spin_us > 0: each read that finds no byte buffered busy-polls the socket for up
        # to this long before it blocks (_spin).
        self.spin_ns = max(0, int(spin_us)) * 1000
        self._inq = bytearray(4)  # FIONREAD's answer, reused (no allocation per poll)
        self._poll: select.poll | None = None
        # cache_headers: (header bytes, payload length) -> the parsed, checked header and
        # layout, for a reader whose frames repeat their headers (the worker's embed
        # requests); identical bytes parse identically, so nothing is trusted that was not
        # checked once.  Each read returns a fresh copy of the header dict.
        self._headers: dict[tuple[bytes, int], tuple[dict[str, Any], Any]] | None = (
            {} if cache_headers else None
        )
        # Room for any prefix + header, so that only a payload may need its own buffer.
        self._buf = bytearray(max(buffer_bytes, PREFIX.size + MAX_HEADER_BYTES))
        self._view = memoryview(self._buf)
        self._start = 0  # first unread byte
        self._end = 0  # end of the bytes received

    def _fill(self, need: int, started: bool) -> None:
        """Receive until ``need`` bytes (<= the buffer's size) are buffered past _start."""
        if self._end - self._start >= need:
            return
        if len(self._buf) - self._start < need:  # compact: move the unread bytes to 0
            held = self._end - self._start
            self._buf[:held] = self._buf[self._start : self._end]
            self._start, self._end = 0, held
        while self._end - self._start < need:
            n = self.sock.recv_into(self._view[self._end :])
            if n == 0:
                where = "mid-frame" if started or self._end > self._start else "between frames"
                raise PeerClosed(f"connection closed {where}")
            self._end += n

    def _spin(self) -> None:
        """Busy-poll until the socket has bytes (or is closed), for at most ``spin_ns``.

        Why: a blocking ``recv`` puts the thread to sleep and its core may go idle; waking
        an idle core (above all a VM's vCPU) cost p99 tails of 1.4-2.4 ms on the H100 box,
        against a 2 ms budget for the whole tower (docs/operations.md, "Overhead of the
        socket").  A thread that keeps polling is awake when the bytes land.

        The loop: ``ioctl(FIONREAD)`` into a reused buffer (bytes queued; no allocation,
        ~0.7 us) and ``os.sched_yield()`` (~1 us, the GIL released meanwhile).  The yield
        matters: a loop that only dropped the GIL for a short syscall took it straight back
        and kept the process's other threads waiting for up to the GIL switch interval
        (5 ms: p99 2.2 ms against 0.05 ms with the yield, in a spinner + echo-thread probe
        on the 2-core box).  Every ``_SPIN_CHECK_EVERY`` iterations: the clock, and
        ``poll(0)``, which sees a closed peer or an error (FIONREAD stays 0 then); the
        ``recv`` that follows then reports it as without spinning.

        Deadlines: on a socket with a timeout (the client's), the spin lasts at most that
        timeout, and when nothing came, the one blocking ``recv`` that follows waits only
        for what is left of it, so the first byte of the answer is waited for exactly as
        long as before (``TimeoutError`` when it does not come).  Without a timeout (the
        worker's connections) it blocks as before.
        """
        if not _SPIN_TOKEN.acquire(blocking=False):
            return  # another thread spins: block as without spinning
        try:
            timeout = self.sock.gettimeout()
            if timeout == 0.0:
                return  # a non-blocking socket: its recv answers at once anyway
            window = self.spin_ns if timeout is None else min(self.spin_ns, int(timeout * 1e9))
            clock = time.monotonic_ns
            started = clock()
            deadline = started + window
            fd = self.sock.fileno()
            if self._poll is None:
                self._poll = select.poll()
                self._poll.register(fd, select.POLLIN)
            ioctl, inq, poll, spin_yield = fcntl.ioctl, self._inq, self._poll.poll, os.sched_yield
            n = 0
            while True:
                ioctl(fd, termios.FIONREAD, inq)
                if inq != _NOTHING_QUEUED:
                    return  # bytes are queued: the recv that follows takes them
                n += 1
                if n == _SPIN_CHECK_EVERY:
                    n = 0
                    if poll(0):  # closed peer or error: the recv reports it
                        return
                    if clock() >= deadline:
                        break
                spin_yield()
        finally:
            _SPIN_TOKEN.release()
        if timeout is None:
            return  # the worker's blocking recv, as before
        left = timeout - (clock() - started) / 1e9
        if left <= 0:
            raise TimeoutError("timed out")  # what the blocking recv would have raised
        self.sock.settimeout(left)
        try:
            got = self.sock.recv_into(self._view[self._end :])
        finally:
            self.sock.settimeout(timeout)
        if got == 0:
            raise PeerClosed("connection closed between frames")
        self._end += got

    def read(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The next frame: (header, {name: array}).  Raises :class:`PeerClosed` when the
        peer is gone, :class:`FrameError` when the bytes break the format."""
        if self.spin_ns and self._start == self._end:
            self._spin()
        self._fill(PREFIX.size, False)
        magic, head_len, payload_len = PREFIX.unpack_from(self._buf, self._start)
        _check_prefix(magic, head_len, payload_len, self.max_payload)
        self._fill(PREFIX.size + head_len, True)
        head_at = self._start + PREFIX.size
        head = bytes(self._view[head_at : head_at + head_len])
        cached = self._headers.get((head, payload_len)) if self._headers is not None else None
        if cached is None:
            header, layout = _parse_header(head, payload_len)
            if self._headers is not None:
                if len(self._headers) >= HEADER_CACHE_SIZE:
                    self._headers.clear()
                self._headers[(head, payload_len)] = (header, layout)
                header = dict(header)
        else:
            header, layout = dict(cached[0]), cached[1]
        at = head_at + head_len
        if PREFIX.size + head_len + payload_len <= len(self._buf):
            self._fill(PREFIX.size + head_len + payload_len, True)
            payload = bytes(self._view[at : at + payload_len])
            self._start = at + payload_len
        else:  # larger than the buffer: its own buffer, read exactly (no over-read)
            held = self._end - at
            buffer = bytearray(payload_len)
            buffer[:held] = self._view[at : self._end]
            view = memoryview(buffer)
            while held < payload_len:
                n = self.sock.recv_into(view[held:], payload_len - held)
                if n == 0:
                    raise PeerClosed("connection closed mid-frame")
                held += n
            payload = bytes(buffer)
            self._start = self._end
        if self._start == self._end:
            self._start = self._end = 0
        return header, _arrays(payload, layout)
