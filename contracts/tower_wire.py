"""The tower worker's wire format: length-prefixed frames over a local stream socket.

A GPU deployment runs the user tower in a separate process (``model.tower_worker``: torch
and the fused Triton kernel) because the service must not import torch; the service's
client is ``service.remote_tower``.  Both sides use this module (numpy and the standard
library only).

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
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

MAGIC = b"T2TW"
PREFIX = struct.Struct(">4sIQ")
MAX_HEADER_BYTES = 64 * 1024
# 256 rows x L = 200 x (8 + 4) bytes is 0.6 MB; 64 MB leaves room and bounds a bad length.
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024
ALLOWED_DTYPES = {"int64": np.dtype("<i8"), "float32": np.dtype("<f4")}

OP_HEALTH = "health"
OP_LOAD = "load"
OP_EMBED = "embed"


class FrameError(ValueError):
    """A frame that breaks the format (the connection is not usable afterwards)."""


class PeerClosed(ConnectionError):
    """The other side closed the connection (cleanly, between frames, or mid-frame)."""


def encode(header: dict[str, Any], arrays: Sequence[tuple[str, np.ndarray]] = ()) -> bytes:
    """One frame: ``header`` (``"arrays"`` is filled in) and the arrays' bytes."""
    specs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array in arrays:
        dtype_name = str(array.dtype)
        if dtype_name not in ALLOWED_DTYPES:
            raise ValueError(f"array {name}: dtype {dtype_name} is not allowed on the wire")
        # np.require keeps 0-d arrays 0-d (ascontiguousarray would make them 1-d).
        data = np.require(array, dtype=ALLOWED_DTYPES[dtype_name], requirements="C")
        specs.append({"name": name, "dtype": dtype_name, "shape": list(data.shape)})
        chunks.append(data.tobytes())
    head = json.dumps({**header, "arrays": specs}, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    payload = b"".join(chunks)
    return PREFIX.pack(MAGIC, len(head), len(payload)) + head + payload


def _recv_exact(sock: socket.socket, size: int, started: bool) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            where = "mid-frame" if started or got else "between frames"
            raise PeerClosed(f"connection closed {where}")
        got += n
    return bytes(buffer)


def read_frame(
    sock: socket.socket, max_payload: int = DEFAULT_MAX_PAYLOAD
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The next frame from ``sock``: (header, {name: array}).  Raises :class:`PeerClosed`
    when the peer is gone, :class:`FrameError` when the bytes break the format."""
    magic, head_len, payload_len = PREFIX.unpack(_recv_exact(sock, PREFIX.size, False))
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}")
    if head_len > MAX_HEADER_BYTES:
        raise FrameError(f"header of {head_len} bytes exceeds {MAX_HEADER_BYTES}")
    if payload_len > max_payload:
        raise FrameError(f"payload of {payload_len} bytes exceeds {max_payload}")
    try:
        header = json.loads(_recv_exact(sock, head_len, True).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"header is not UTF-8 JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise FrameError("header is not a JSON object")
    specs = header.get("arrays", [])
    if not isinstance(specs, list):
        raise FrameError("header arrays is not a list")
    # Validate every spec (and the byte total) before reading the payload.
    layout: list[tuple[str, np.dtype, tuple[int, ...], int]] = []
    total = 0
    for spec in specs:
        if not isinstance(spec, dict):
            raise FrameError("array spec is not an object")
        name, dtype_name, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
        if not isinstance(name, str) or dtype_name not in ALLOWED_DTYPES:
            raise FrameError(f"array spec {spec!r}: bad name or dtype")
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        ):
            raise FrameError(f"array {name}: bad shape {shape!r}")
        dtype = ALLOWED_DTYPES[dtype_name]
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize
        total += size
        layout.append((name, dtype, tuple(shape), size))
    if total != payload_len:
        raise FrameError(f"arrays need {total} bytes, payload has {payload_len}")
    payload = _recv_exact(sock, payload_len, True) if payload_len else b""
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for name, dtype, shape, size in layout:
        if name in arrays:
            raise FrameError(f"array {name} sent twice")
        arrays[name] = np.frombuffer(payload, dtype=dtype, count=size // dtype.itemsize,
                                     offset=offset).reshape(shape)  # fmt: skip
        offset += size
    return header, arrays
