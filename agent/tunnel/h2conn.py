"""HTTP/2 connections carrying HBONE CONNECT streams, on asyncio transports,
with the `h2` library as the protocol engine.

(Over 600 lines on purpose: the corrections to h2's state machine, GOAWAY
drains, the rapid-reset budget and the flow-controlled stream transport all
act on one connection's state; apart they would share it through privates.)

The hot path is DATA frames.  Costs measured against h2 and kept low here:
- frames as large as the peer allows (we advertise 1 MiB, as ztunnel does)
  so per-frame work is paid per MiB, not per 16 KiB;
- stream window 4 MiB, connection window 16 MiB (ztunnel's sizes): a fast
  stream is never stalled by WINDOW_UPDATE round trips;
- every event batch is flushed with one transport write.
- DATA without flags on an open stream (nearly every frame of a relayed
  connection) skips h2's per-frame objects and state machines, both ways,
  with h2's own windows debited (_H2Connection, FAST_DATA): 2-3x less CPU
  per 1 KiB message in h2 (`tether bench h2`).
Backpressure is end to end: a stream whose consumer is slow stops
acknowledging data, its window closes, and the sender stops.

One change to the libraries, measured (`tether bench h2`): h2 calls
`repr(frame)` on every frame it receives, for a debug log line nobody reads,
and hyperframe's DATA repr serializes and hex-encodes the whole payload
before cutting it to 20 characters: 56-67 % of h2's receive cost at 1 MiB
frames.  DataFrame's body repr is replaced by its length, which changes
only that debug string; h2 and hyperframe behave otherwise exactly as
shipped.  h2's per-byte cost dropped 3.4-4x with it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import struct
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import h2.stream
import hpack
import hyperframe.exceptions
import hyperframe.frame

from agent.tunnel import limits


def data_body_repr(self: hyperframe.frame.DataFrame) -> str:
    """O(1) text for a DATA frame: h2 formats every frame it handles for a
    debug string nobody reads, and hyperframe hex-encodes the whole payload
    there (`tether bench h2` measures both)."""
    return f"<{len(self.data)} bytes>"


# hyperframe's own, kept so the benchmark can measure the unpatched path
HYPERFRAME_DATA_BODY_REPR = hyperframe.frame.DataFrame._body_repr
hyperframe.frame.DataFrame._body_repr = data_body_repr  # type: ignore[method-assign,assignment]

log = logging.getLogger(__name__)

STREAM_WINDOW = 4 * 1024 * 1024
CONN_WINDOW = 16 * 1024 * 1024
MAX_FRAME = 1024 * 1024
MAX_STREAMS = 100
MAX_HEADER_LIST = 16 * 1024
HIGH_WATER = 4 * 1024 * 1024  # transport buffer above which we stop writing more
DEFER_FLUSH_MIN = 16 * 1024  # a stream write this large is written at the end of the loop turn
# A window's first refresh (WINDOW_UPDATE) goes out once ACK_FIRST consumed
# bytes have gathered; later ones after half a window, as h2 does: see
# _H2Connection.acknowledge_received_data.  H2Conn acknowledges a received
# batch's DATA once per stream, after the batch.  Measured (`bench tunnel
# --cross-only`, 3 runs each against h2's rule throughout, load 0.7-1.4): refreshing every
# 16 KiB throughout cost 22 % more CPU per GB, every 256 KiB level in one
# A/B and 25 % more in another (a receiver-bound sender is woken 8x as
# often, for smaller writes); the first refresh alone costs one frame per
# stream that carries 16 KiB.
ACK_FIRST = 16 * 1024
LAST_STREAM_ID = 2**31 - 1  # a drain's first GOAWAY: "any stream you may have sent"
DRAIN_PING_WAIT = 1.0  # between a drain's two GOAWAYs, at most (without a PING answer)
CLOSE_WAIT = 2.0  # for close_notify to go out when draining every connection


FRAME_HEADER = struct.Struct(">HBBBL")  # hyperframe's layout: 24-bit length, type, flags, id
JOIN_BELOW = 16 * 1024  # DATA payloads smaller than this go out in one piece with their header

# DATA without flags on an open stream skips h2's per-frame objects and state
# machines (see _H2Connection).  TETHER_H2_FAST_DATA=0 turns it off: h2 then
# handles every frame as shipped (for A/B runs of `tether bench tunnel`).
FAST_DATA = os.environ.get("TETHER_H2_FAST_DATA", "1").strip() != "0"
# (tuples: membership by identity, without Enum's Python-level __hash__)
_CONN_OPEN = (h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionState.SERVER_OPEN)
_CAN_SEND_DATA = (h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE)
_CAN_RECV_DATA = (h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_LOCAL)


class PlainData:
    """A received DATA frame without flags (no END_STREAM, no padding), as the
    frame buffer hands it over: no hyperframe objects are built for it, and
    _H2Connection accounts for it without h2's state machines when the stream
    can take it, else it becomes a hyperframe DataFrame and h2 decides.  The
    payload stays in the pieces it arrived in (a frame spanning TLS reads)."""

    __slots__ = ("length", "pieces", "stream_id")

    def __init__(self, stream_id: int, pieces: list[memoryview], length: int) -> None:
        self.stream_id = stream_id
        self.pieces = pieces
        self.length = length

    def __repr__(self) -> str:  # for debugging: O(1), never the payload
        return f"PlainData(stream_id={self.stream_id}, <{self.length} bytes>)"

    def to_frame(self) -> hyperframe.frame.DataFrame:
        f = hyperframe.frame.DataFrame(self.stream_id)
        f.data = _joined(self.pieces)  # type: ignore[assignment]  # read-only view
        return f


def _joined(pieces: list[memoryview]) -> memoryview:
    return pieces[0] if len(pieces) == 1 else memoryview(b"".join(pieces))


class DataPieces(h2.events.DataReceived):
    """h2's DataReceived for a fast-path frame, its payload kept as the pieces
    it arrived in, so a bridge hands them to the socket in one writev instead
    of joining them (a copy of nearly every frame: 1 MiB frames span several
    TLS reads); `.data` joins them for anyone else.  Built without h2's
    __init__, whose signature differs between h2 versions."""

    def __init__(self, stream_id: int, pieces: list[memoryview], length: int) -> None:
        self.stream_id = stream_id
        self.pieces = pieces
        self.flow_controlled_length = length
        self.stream_ended = None

    @property  # type: ignore[override]
    def data(self) -> memoryview:
        return _joined(self.pieces)

    @data.setter
    def data(self, value: memoryview) -> None:
        self.pieces = [value]


PIN_RATIO = 4  # a kept DATA payload view may hold alive at most this many times its size


def _unpinned(v: memoryview) -> memoryview:
    """A DATA payload outlives the read it came in (queued for the app
    socket, or held until the stream is attached), and a view keeps the
    whole read alive.  A payload that is a small part of a large read is
    copied instead: else a peer interleaving 1-byte DATA for a stream whose
    app does not read with bulk DATA on another could make each byte it is
    allowed to send (flow control counts bytes, not what they pin) hold a
    whole read of up to hundreds of KiB.  Bulk frames are most of their
    reads and stay views; small messages are their whole read."""
    whole = v.obj
    if whole is not None and len(v) * PIN_RATIO < len(whole):  # type: ignore[arg-type]
        return memoryview(v.tobytes())
    return v


class _FrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer without copying DATA payloads.  h2 appends every
    received piece to one bytearray (a copy, and a move of what is left
    whenever it grows), slices each frame's body out of it (a copy) and
    hyperframe copies the body again (`.tobytes()`).  Here received pieces
    are kept as they came (immutable bytes), and a DATA frame's payload is a
    read-only view of the piece holding it: no copy at all unless the frame
    spans pieces (then one join).  Other frames, padded DATA included, are
    parsed by hyperframe as before; the preamble check, frame size limit
    and header-block handling are h2's."""

    def __init__(self, server: bool = False) -> None:
        super().__init__(server=server)
        self._chunks: collections.deque[memoryview] = collections.deque()
        self._size = 0
        self._fresh = 0  # chunks added since the last _wait_for_more

    def add_data(self, data: bytes) -> None:  # type: ignore[override]
        view = memoryview(data if isinstance(data, bytes) else bytes(data))
        if self._preamble_len:
            n = min(self._preamble_len, len(view))
            if self._preamble[:n] != view[:n]:
                raise h2.exceptions.ProtocolError("Invalid HTTP/2 preamble.")
            view = view[n:]
            self._preamble_len -= n
            self._preamble = self._preamble[n:]
        if len(view):
            self._chunks.append(view)
            self._size += len(view)
            self._fresh += 1

    def _peek(self, n: int) -> memoryview:
        first = self._chunks[0]
        if len(first) >= n:
            return first[:n]
        out = bytearray()
        for c in self._chunks:
            out += c[: n - len(out)]
            if len(out) >= n:
                break
        return memoryview(bytes(out))

    def _take(self, n: int) -> memoryview:
        if not n:
            return memoryview(b"")
        first = self._chunks[0]
        if len(first) < n:  # spans pieces: one join
            return memoryview(b"".join(self._take_pieces(n)))
        self._size -= n
        if len(first) == n:
            self._chunks.popleft()
        else:
            self._chunks[0] = first[n:]
        return first[:n]

    def _take_pieces(self, n: int) -> list[memoryview]:
        """The next n bytes as views of the pieces holding them (no join)."""
        self._size -= n
        parts = []
        while n:
            c = self._chunks[0]
            if len(c) <= n:
                parts.append(c)
                self._chunks.popleft()
                n -= len(c)
            else:
                parts.append(c[:n])
                self._chunks[0] = c[n:]
                n = 0
        return parts

    def _wait_for_more(self) -> StopIteration:
        """What waits for the rest of its frame keeps the reads it is in
        alive: a part smaller than a quarter of its read is copied (as a
        kept payload is, `_unpinned`), so a peer cannot pin a whole read
        (up to 256 KiB) on each connection it opens with the few bytes of
        an unfinished frame at its end.  Only the parts added since the last
        wait, and the first (partly taken), can have changed: a frame fed a
        byte at a time stays linear."""
        chunks = self._chunks
        n = len(chunks)
        if n:
            chunks[0] = _unpinned(chunks[0])
            for i in range(max(1, n - self._fresh), n):
                chunks[i] = _unpinned(chunks[i])
        self._fresh = 0
        return StopIteration()

    def __next__(self) -> hyperframe.frame.Frame:
        if self._size < 9:
            raise self._wait_for_more()
        head = self._peek(9)
        if FAST_DATA and head[3] == 0 and head[4] == 0 and not self._headers_buffer:
            # type DATA, no flags, outside a header block (where only
            # CONTINUATION may come): no hyperframe objects at all
            hi, lo, _, _, sid = FRAME_HEADER.unpack(head)
            sid &= 0x7FFFFFFF
            if sid:  # DATA on stream 0 is h2's (and hyperframe's) error to raise
                length = (hi << 8) | lo
                if self._size < length + 9:
                    raise self._wait_for_more()
                self._validate_frame_length(length)
                self._take(9)
                pieces = [_unpinned(p) for p in self._take_pieces(length)]
                return PlainData(sid, pieces, length)  # type: ignore[return-value]
        try:
            f, length = hyperframe.frame.Frame.parse_frame_header(head)
        except (
            hyperframe.exceptions.InvalidDataError,
            hyperframe.exceptions.InvalidFrameError,
        ) as e:
            raise h2.exceptions.ProtocolError(f"Received frame with invalid header: {e!s}") from e
        if self._size < length + 9:
            raise self._wait_for_more()
        self._validate_frame_length(length)
        self._take(9)
        body = self._take(length)
        if type(f) is hyperframe.frame.DataFrame and "PADDED" not in f.flags:
            f.data = _unpinned(body)  # type: ignore[assignment]  # read-only view, no copy
            f.body_len = length
        else:
            try:
                f.parse_body(body)
            except hyperframe.exceptions.InvalidDataError as e:
                raise h2.exceptions.ProtocolError("Received frame with non-compliant data") from e
            except hyperframe.exceptions.InvalidFrameError as e:
                raise h2.exceptions.FrameDataMissingError("Frame data missing or invalid") from e
        new = self._update_header_buffer(f)
        return new if new is not None else self.__next__()


class _H2Connection(h2.connection.H2Connection):
    """h2's connection with two RFC 9113 corrections, both turning a
    connection error into a stream error so that one bad request never tears
    down the (up to a hundred) streams already running on the connection:
    - a HEADERS frame that would exceed our MAX_CONCURRENT_STREAMS is refused
      with RST_STREAM REFUSED_STREAM (§5.1.2); its header block is still
      decoded, so the HPACK state stays in step with the peer;
    - a malformed request (§8.1.1: missing or duplicate pseudo-headers,
      CONNECT with :path, uppercase field names, ...) gets RST_STREAM
      PROTOCOL_ERROR.  h2 validates after the header block is decoded, so the
      HPACK state is in step; a block that fails to *decode* stays a
      connection error (COMPRESSION_ERROR territory: the state is lost)."""

    # Graceful drain (RFC 9113 §6.8).  h2 moves its connection state machine
    # to CLOSED on any GOAWAY, sent or received; in CLOSED every later frame
    # (the PING a draining Go or Envoy peer sends next, WINDOW_UPDATE, DATA)
    # is a ProtocolError, so the streams the GOAWAY promised to finish died
    # with a GOAWAY(PROTOCOL_ERROR) of ours.  GOAWAY never reaches h2's state
    # machine here: a received one is reported as ConnectionTerminated (H2Conn
    # keeps the streams at or below its last_stream_id and opens no new one);
    # ours are written as frames by send_goaway, and HEADERS above the last
    # id we announced are refused here.  Everything else in h2 is unchanged.
    goaway_sent: int | None = None  # the last_stream_id of our latest GOAWAY
    refused = 0  # streams refused by the concurrency limit or a GOAWAY (reset budget)

    # Fewer copies per DATA byte.  h2 serializes every frame (payload joined
    # with its padding, then with its header), appends that to a bytearray
    # and hands out a bytes copy of it: four copies of each payload before
    # TLS reads it.  Here a DATA frame goes out as its 9-byte header and the
    # payload object itself, in order with everything else h2 queued, and
    # the transport takes the pieces in one writelines().
    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self._out: list[bytes] = []
        self.incoming_buffer = _FrameBuffer(server=not config.client_side)

    # The DATA fast path (FAST_DATA).  Per 1 KiB message h2 spent most of its
    # time on objects, not decisions: a hyperframe DataFrame with Flags and
    # Padding per frame sent and received, the stream's and the connection's
    # state machines stepping from OPEN to OPEN, and debug strings formatted
    # for a logger that drops them.  When the frame needs no decision (no
    # flags, the connection open, the stream in a state where DATA is allowed
    # and changes nothing, no content-length to track, within both flow
    # control windows) the same bookkeeping is done here directly: the
    # windows h2 keeps are debited, the same DataReceived event is returned,
    # the same bytes go out.  Anything else (END_STREAM, padding, a closed or
    # unknown stream, a window overrun) goes through h2 unchanged, so its
    # errors and RST_STREAMs are h2's.
    def _plain_fast(self, f: PlainData) -> DataPieces | None:
        """The fast path's event for `f`, its windows debited; None when
        the frame needs h2's decision."""
        n = f.length
        stream = self.streams.get(f.stream_id)
        conn_window = self._inbound_flow_control_window_manager
        if (
            stream is None
            or self.state_machine.state not in _CONN_OPEN
            or stream.state_machine.state not in _CAN_RECV_DATA
            or not stream.state_machine.headers_received
            or stream._expected_content_length is not None
            or n > conn_window.current_window_size
            or n > stream._inbound_window_manager.current_window_size
        ):
            return None
        conn_window.current_window_size -= n
        stream._inbound_window_manager.current_window_size -= n
        stream._actual_content_length += n
        return DataPieces(f.stream_id, f.pieces, n)

    def receive_data(self, data: Any) -> list[h2.events.Event]:
        """h2's receive_data, except that a DATA frame the fast path takes
        is handled right here, not through h2's _receive_frame: that formats
        every frame with repr() for a trace line nobody logs, looks up its
        handler and queues an empty list of frames to send, per message.
        One it does not take becomes h2's DataFrame and goes where every
        other frame goes: h2 decides, and every error is h2's as before."""
        events: list[h2.events.Event] = []
        buf = self.incoming_buffer
        buf.add_data(data)
        buf.max_frame_size = self.max_inbound_frame_size
        try:
            for frame in buf:
                if type(frame) is PlainData:  # type: ignore[comparison-overlap]
                    ev = self._plain_fast(frame)
                    if ev is not None:
                        events.append(ev)
                        continue
                    frame = frame.to_frame()
                events.extend(self._receive_frame(frame))
        except hyperframe.exceptions.InvalidPaddingError as e:
            self._terminate_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            raise h2.exceptions.ProtocolError("Received frame with invalid padding.") from e
        except h2.exceptions.ProtocolError as e:
            self._terminate_connection(e.error_code)
            raise
        return events

    # Flow control refresh.  h2 returns consumed bytes to the peer only once
    # half a window has gathered, the first time too.  A sender with a burst
    # ready (a response) sends our whole window at once and then waits for
    # 2 MiB of our work, though we took the bytes long before.  That costs
    # more than time: Envoy resets a waypoint's CONNECT stream
    # (CONNECT_ERROR) when its inner connection closes, as after a response
    # to `connection: close`, and discards whatever still waited for window;
    # a response a little over 4 MiB lost its tail on most requests.  Here
    # a window's first refresh goes out once ACK_FIRST bytes are consumed
    # (after the received batch they came in), later ones as h2 does; the
    # bytes acknowledged are the same, so backpressure is unchanged.
    def acknowledge_received_data(self, acknowledged_size: int, stream_id: int) -> None:
        frames: list[hyperframe.frame.Frame] = []
        inc = _refresh(self._inbound_flow_control_window_manager, acknowledged_size)
        if inc:
            frames.append(_window_update(0, inc))
        stream = self.streams.get(stream_id)
        if stream is not None and stream.open:  # h2's rule: no update for a closed stream
            inc = _refresh(stream._inbound_window_manager, acknowledged_size)
            if inc:
                frames.append(_window_update(stream_id, inc))
        if frames:
            self._prepare_for_sending(frames)

    def send_data(
        self,
        stream_id: int,
        data: bytes | memoryview,
        end_stream: bool = False,
        pad_length: int | None = None,
    ) -> None:
        n = len(data)
        stream = self.streams.get(stream_id)
        if (
            not FAST_DATA
            or end_stream
            or pad_length is not None
            or not n
            or stream is None
            or self.state_machine.state not in _CONN_OPEN
            or stream.state_machine.state not in _CAN_SEND_DATA
            or n > self.outbound_flow_control_window
            or n > stream.outbound_flow_control_window
            or n > self.max_outbound_frame_size
        ):
            super().send_data(stream_id, data, end_stream, pad_length)
            return
        out = self._out
        if self._data_to_send:
            out.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        out.append(FRAME_HEADER.pack((n >> 8) & 0xFFFF, n & 0xFF, 0x0, 0x0, stream_id))
        out.append(data)  # type: ignore[arg-type]  # the transport takes any buffer
        self.outbound_flow_control_window -= n
        stream.outbound_flow_control_window -= n

    def _prepare_for_sending(self, frames: list[hyperframe.frame.Frame]) -> None:
        if not frames:
            return
        out = self._out
        if self._data_to_send:
            out.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        for f in frames:
            if (
                type(f) is hyperframe.frame.DataFrame
                and not f.pad_length
                and len(f.data) >= JOIN_BELOW
                and "PADDED" not in f.flags
            ):
                n = len(f.data)
                end = 0x01 if "END_STREAM" in f.flags else 0
                out.append(FRAME_HEADER.pack((n >> 8) & 0xFFFF, n & 0xFF, 0x0, end, f.stream_id))
                out.append(f.data)
            else:
                out.append(f.serialize())

    def chunks_to_send(self) -> list[bytes]:
        """Everything queued, in order, as pieces (no joining copy)."""
        out, self._out = self._out, []
        if self._data_to_send:
            out.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        return out

    def data_to_send(self, amount: int | None = None) -> bytes:
        data = b"".join(self.chunks_to_send())
        if amount is None or amount >= len(data):
            return data
        self._out = [data[amount:]]
        return data[:amount]

    def clear_outbound_data_buffer(self) -> None:
        self._out = []
        self._data_to_send = bytearray()

    def _receive_goaway_frame(self, frame: Any) -> Any:
        ev = h2.events.ConnectionTerminated()
        ev.error_code = h2.errors._error_code_from_int(frame.error_code)
        ev.last_stream_id = frame.last_stream_id
        ev.additional_data = frame.additional_data or None
        return [], [ev]

    def send_goaway(self, last_stream_id: int, code: int = h2.errors.ErrorCodes.NO_ERROR) -> None:
        f = hyperframe.frame.GoAwayFrame(0)
        f.last_stream_id = last_stream_id
        f.error_code = code
        self._data_to_send += f.serialize()
        self.goaway_sent = last_stream_id

    def _refuse_headers(self, frame: Any) -> Any:
        self.decoder.decode(frame.data, raw=True)  # keep the HPACK state in step
        self.highest_inbound_stream_id = max(self.highest_inbound_stream_id, frame.stream_id)
        # later frames on it get RST_STREAM too, not a connection error
        self._closed_streams[frame.stream_id] = h2.stream.StreamClosedBy.SEND_RST_STREAM
        self.refused += 1
        rst = hyperframe.frame.RstStreamFrame(frame.stream_id)
        rst.error_code = h2.errors.ErrorCodes.REFUSED_STREAM
        return [rst], []

    def _receive_headers_frame(self, frame: Any) -> Any:
        opens = not self.config.client_side and frame.stream_id not in self.streams
        if (
            opens
            and self.goaway_sent is not None
            and frame.stream_id > self.goaway_sent
            and frame.stream_id > self.highest_inbound_stream_id
        ):
            return self._refuse_headers(frame)  # after our GOAWAY: never processed
        try:
            return super()._receive_headers_frame(frame)
        except h2.exceptions.TooManyStreamsError:
            return self._refuse_headers(frame)
        except h2.exceptions.ProtocolError as e:
            # Only a plain ProtocolError raised after decoding, on the request
            # stream h2 created for this frame (so nothing above h2 knows of
            # it yet): header validation.  Decoding failures carry their
            # HPACK cause; DenialOfServiceError and the other subclasses keep
            # h2's connection-level handling, as do responses and trailers.
            if (
                not opens
                or type(e) is not h2.exceptions.ProtocolError
                or e.__cause__ is not None
                or frame.stream_id not in self.streams
            ):
                raise
            log.info(
                "malformed request on stream %d refused (RST_STREAM PROTOCOL_ERROR): %s",
                frame.stream_id,
                e,
            )
            try:
                self.reset_stream(frame.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            except h2.exceptions.StreamClosedError:  # the stream's own state machine closed it
                rst = hyperframe.frame.RstStreamFrame(frame.stream_id)
                rst.error_code = h2.errors.ErrorCodes.PROTOCOL_ERROR
                return [rst], []
            return [], []


def _refresh(window: Any, consumed: int) -> int:
    """h2's WindowManager.process_bytes, except that the window's first
    refresh goes out once ACK_FIRST bytes have gathered (h2: half the
    window): the increment to send, or 0."""
    if getattr(window, "refreshed", False) or window._bytes_processed + consumed < ACK_FIRST:
        inc = window.process_bytes(consumed) or 0  # h2's rules
    else:  # what h2 sends at half a window, now
        window._bytes_processed += consumed
        inc = min(window._bytes_processed, window.max_window_size - window.current_window_size)
        window._bytes_processed = 0
        window.current_window_size += inc
    if inc:
        window.refreshed = True
    return int(inc)


def _window_update(stream_id: int, increment: int) -> hyperframe.frame.WindowUpdateFrame:
    f = hyperframe.frame.WindowUpdateFrame(stream_id)
    f.window_increment = increment
    return f


class _Encoder(hpack.Encoder):
    """HPACK without Huffman coding.  Huffman is optional per string (RFC
    7541 §5.2); in hpack it is pure Python per character, both to encode
    and, at a tether peer, to decode: a CONNECT's values are ~200 bytes, a
    few of them new on every request (traceparent, forwarded)."""

    def encode(self, headers: Any, huffman: bool = False) -> bytes:
        return super().encode(headers, huffman=False)


class StreamReset(ConnectionError):
    """The peer reset the stream or the connection went away."""


class H2Stream:
    """One HTTP/2 stream, presented to a relay like a transport."""

    def __init__(self, conn: H2Conn, stream_id: int, headers: list[tuple[str, str]]) -> None:
        self.conn = conn
        # the connection's loop, which every stream of it runs on (asked
        # once: CPython 3.11's get_running_loop() is a getpid syscall)
        self.loop = loop = conn._loop
        self.id = stream_id
        self.request_headers = headers
        self.response: asyncio.Future[list[tuple[str, str]]] = loop.create_future()
        self.on_data: Callable[[bytes], None] | None = None
        self.on_pieces: Callable[[list[memoryview]], None] | None = None
        self.on_eof: Callable[[], None] | None = None
        self.on_close: Callable[[Exception | None], None] | None = None
        self._pending: collections.deque[bytes] = collections.deque()
        self._pending_bytes = 0
        self._eof_pending = False
        self._unacked = 0
        self._reading = True
        self._early: list[Any] = []  # bytes or read-only views, as delivered
        self._early_eof = False
        self.eof_received = False  # the peer's END_STREAM: its side ended cleanly
        self.closed = False
        self.started = loop.time()
        self.bytes_in = 0
        self.bytes_out = 0
        self._drained = asyncio.Event()
        self._drained.set()

    # -- consumer side -------------------------------------------------------

    def attach(
        self,
        on_data: Callable[[bytes], None],
        on_eof: Callable[[], None],
        on_close: Callable[[Exception | None], None],
        on_pieces: Callable[[list[memoryview]], None] | None = None,
    ) -> None:
        """Start delivering; bytes that arrived before this are delivered now.
        `on_pieces`, if given, takes a payload that arrived in pieces in one
        call (else `on_data` gets each piece)."""
        self.on_data, self.on_eof, self.on_close = on_data, on_eof, on_close
        self.on_pieces = on_pieces
        early, self._early = self._early, []
        if on_pieces is not None and len(early) > 1:
            on_pieces(early)
        else:
            for chunk in early:
                on_data(chunk)
        if self._reading and self._unacked:  # the early bytes are the app's now
            self.conn.ack(self.id, self._unacked)
            self._unacked = 0
        if self._early_eof:
            on_eof()

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        self._reading = True
        if self._unacked and self.on_data is not None:
            self.conn.ack(self.id, self._unacked)
            self._unacked = 0

    def _deliver(self, data: bytes, flow_len: int) -> None:
        self.bytes_in += len(data)
        if self.on_data is None:
            # Before attach (the destination still being dialled): kept, and
            # not acknowledged, so what a peer can make us hold is one stream
            # window, not whatever it sends until the dial times out.
            self._early.append(data)
            self._unacked += flow_len
            return
        self.on_data(data)
        if self._reading:
            self.conn.ack(self.id, flow_len)
        else:
            self._unacked += flow_len

    def _deliver_pieces(self, pieces: list[memoryview], flow_len: int) -> None:
        """A fast-path frame's payload (no padding: flow_len is its length)."""
        if len(pieces) == 1 or self.on_data is None or self.on_pieces is None:
            for p in pieces:
                self._deliver(cast(bytes, p), len(p))  # a read-only view, as h2's data is
            return
        self.bytes_in += flow_len
        self.on_pieces(pieces)
        if self._reading:
            self.conn.ack(self.id, flow_len)
        else:
            self._unacked += flow_len

    def _deliver_eof(self) -> None:
        self.eof_received = True
        if self.on_eof is None:
            self._early_eof = True
        else:
            self.on_eof()

    # -- producer side --------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.closed or not data:
            return
        self._queue(data)
        self.conn.flush_stream(self, len(data))

    def _queue(self, data: bytes) -> None:
        """Take `data` to send; the connection frames it as windows allow."""
        self.bytes_out += len(data)
        self._pending.append(data)
        self._pending_bytes += len(data)
        self._drained.clear()

    def write_eof(self) -> None:
        if self.closed:
            return
        self._eof_pending = True
        self.conn.flush_stream(self)

    def buffered(self) -> int:
        return self._pending_bytes

    async def drain(self) -> None:
        await self._drained.wait()

    def reset(self, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        if not self.closed:
            self.conn.reset_stream(self.id, code)

    def _closed(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self._pending.clear()
        self._pending_bytes = 0
        self._drained.set()
        if self._unacked:
            # held (before attach, or while the app was not reading) and now
            # never delivered: the connection's window gets them back (h2
            # credits only the connection for a closed stream), or every
            # such stream would shrink it for good until all streams stall
            self._early = []
            self.conn.ack(self.id, self._unacked)
            self._unacked = 0
        if not self.response.done():
            self.response.set_exception(exc or StreamReset(f"stream {self.id} closed"))
            # a server-side stream has nobody waiting for a response: mark the
            # exception retrieved so asyncio does not log it as lost
            self.response.exception()
        if self.on_close is not None:
            self.on_close(exc)


RequestHandler = Callable[["H2Conn", H2Stream], Awaitable[None]]


class H2Conn(asyncio.Protocol):
    """One HTTP/2 connection (client or server side) over a TLS transport.

    Abuse bounds (server side): at most MAX_STREAMS requests are handled at
    once, counting handlers still delivering after their stream went away;
    a request's handler (and with it any socket) starts only after the whole
    received batch is processed, so a HEADERS reset in the same batch costs
    nothing; stream resets spend a ResetBudget, and an empty budget is
    GOAWAY(ENHANCE_YOUR_CALM); a connection with no stream for
    `idle_timeout` is closed gracefully."""

    def __init__(
        self,
        client: bool,
        on_request: RequestHandler | None = None,
        peer: dict[str, Any] | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        cfg = h2.config.H2Configuration(
            client_side=client,
            header_encoding="utf-8",
            validate_inbound_headers=True,
            # what we send is ours (request_headers, respond): h2's generic
            # checks of it were a fifth of a stream's cost; the peer's are kept
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = _H2Connection(config=cfg)
        self.h2.encoder = _Encoder()
        self.client = client
        self.on_request = on_request
        self.peer: dict[str, Any] = peer or {}
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._write_paused = False
        self._handlers: set[asyncio.Task[None]] = set()
        self._starting: list[H2Stream] = []
        self.last_used = asyncio.get_running_loop().time()
        self.idle_timeout = idle_timeout
        self._idle_timer: asyncio.TimerHandle | None = None
        self.resets = limits.ResetBudget()
        self.draining = False  # a GOAWAY went either way: no new streams from us
        self.goaway_received: int | None = None  # the peer's last_stream_id
        self.on_goaway: list[Callable[[], None]] = []  # the pool forgets us at once
        self._ping: tuple[bytes, asyncio.Future[None]] | None = None
        self._closing = False
        self._batching = False  # inside data_received: acks wait for its end
        self._acks: dict[int, int] = {}  # stream id -> bytes consumed in this batch
        self._flush_soon = False  # a _flush_later is scheduled
        self._loop = asyncio.get_running_loop()
        _live_here().add(self)

    # -- asyncio protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses (same interface)
        self.transport = cast(asyncio.Transport, transport)
        self.h2.initiate_connection()
        # Through update_settings, not by replacing local_settings: h2 applies
        # our larger frame size to inbound parsing only when the peer ACKs.
        settings: dict[h2.settings.SettingCodes | int, int] = {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
        }
        if self.client:
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        self.h2.update_settings(settings)
        self.h2.increment_flow_control_window(CONN_WINDOW - 65535)
        self._flush()
        if not self.client and not self.ready.done():
            self.ready.set_result(None)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        refused = self.h2.refused
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            log.info("HTTP/2 protocol error from %s: %s", self.peer.get("addr"), e)
            self._flush()
            self.close()
            return
        # The batch's DATA is acknowledged once per stream after it (one
        # WINDOW_UPDATE each at most), in the one flush below: not a frame
        # and a transport write (TLS record, syscall) per DATA frame
        self._batching = True
        try:
            for ev in events:
                self._event(ev)
        finally:
            self._batching = False
            if self._acks:
                acks, self._acks = self._acks, {}
                for sid, n in acks.items():
                    self.h2.acknowledge_received_data(n, sid)
        for _ in range(self.h2.refused - refused):
            self._spend_reset()
        self._start_handlers()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        _live_here().discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        # Lost with streams open (no END_STREAM both ways): an abort, never a
        # clean end, whatever the transport says.
        err = exc or StreamReset("connection closed")
        self._starting.clear()
        for s in list(self.streams.values()):
            s._closed(err)
        self.streams.clear()
        if self._ping is not None and not self._ping[1].done():
            self._ping[1].set_result(None)
        if not self.ready.done():
            self.ready.set_exception(err)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for s in list(self.streams.values()):
            self._send_pending(s)
        self._flush()

    # -- events ---------------------------------------------------------------

    def _event(self, ev: h2.events.Event) -> None:
        if type(ev) is DataPieces:  # the hot one first
            dp = self.streams.get(ev.stream_id)
            if dp is not None:
                dp._deliver_pieces(ev.pieces, ev.flow_controlled_length)
        elif isinstance(ev, h2.events.DataReceived):
            ds = self.streams.get(ev.stream_id or 0)
            if ds is not None:
                assert ev.data is not None
                ds._deliver(ev.data, ev.flow_controlled_length or 0)
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            if self.client and not self.ready.done():
                self.ready.set_result(None)
            for s in list(self.streams.values()):
                self._send_pending(s)
        elif isinstance(ev, h2.events.RequestReceived):
            assert ev.stream_id is not None and ev.headers is not None
            stream = H2Stream(self, ev.stream_id, [(str(k), str(v)) for k, v in ev.headers])
            self.streams[ev.stream_id] = stream
            self.last_used = self._loop.time()
            if self.on_request is None:
                self.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                return
            if len(self._handlers) + len(self._starting) >= MAX_STREAMS:
                # h2 counts open streams; handlers still delivering for streams
                # already reset count here too, so resets cannot multiply them.
                self._spend_reset()
                self.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                return
            self._starting.append(stream)
        elif isinstance(ev, h2.events.ResponseReceived):
            rs = self.streams.get(ev.stream_id or 0)
            if rs is not None and not rs.response.done() and ev.headers is not None:
                rs.response.set_result([(str(k), str(v)) for k, v in ev.headers])
        elif isinstance(ev, h2.events.StreamEnded):
            es = self.streams.get(ev.stream_id or 0)
            if es is not None:
                es._deliver_eof()
                self._maybe_forget(es)
        elif isinstance(ev, h2.events.StreamReset):
            gone = self.streams.pop(ev.stream_id or 0, None)
            now = self._loop.time()
            if not self.client and (gone is None or now - gone.started < limits.PREMATURE_RESET):
                # premature resets only (Envoy's rule): an app aborting a
                # long transfer is no attack, HEADERS+RST at once is
                self._spend_reset()
            if gone is not None:
                if ev.error_code == h2.errors.ErrorCodes.NO_ERROR and gone.eof_received:
                    # RFC 9113 §8.1: after a complete response, "stop sending"
                    gone._closed(None)
                else:
                    gone._closed(StreamReset(f"stream reset by peer (code {ev.error_code})"))
                self._stream_gone()
        elif isinstance(ev, h2.events.WindowUpdated):
            targets = (
                list(self.streams.values())
                if not ev.stream_id
                else [s for s in [self.streams.get(ev.stream_id)] if s]
            )
            for s in targets:
                self._send_pending(s)
        elif isinstance(ev, h2.events.PingAckReceived):
            ping = self._ping
            if ping is not None and ev.ping_data == ping[0] and not ping[1].done():
                ping[1].set_result(None)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._goaway_received(ev)

    def _goaway_received(self, ev: h2.events.ConnectionTerminated) -> None:
        """RFC 9113 §6.8: streams up to last_stream_id may still complete;
        ours above it were never processed (retryable).  No new stream goes
        here; the connection closes when its last stream ends."""
        last = ev.last_stream_id if ev.last_stream_id is not None else 0
        self.goaway_received = (
            last if self.goaway_received is None else min(last, self.goaway_received)
        )
        log.info(
            "GOAWAY from %s (%s, last stream %d): draining %d streams",
            self.peer.get("addr"),
            ev.error_code,
            last,
            len(self.streams),
        )
        if self.client:
            for sid in [sid for sid in self.streams if sid > last]:
                gone = self.streams.pop(sid)
                gone._closed(StreamReset(f"stream {sid} refused by GOAWAY"))
        self._start_draining()

    def _start_draining(self) -> None:
        if not self.draining:
            self.draining = True
            for cb in self.on_goaway:
                cb()
        self._close_if_drained()

    def _close_if_drained(self) -> None:
        if self.draining and not self.streams and not self._handlers and not self._starting:
            self.close()

    def _stream_gone(self) -> None:
        self.last_used = self._loop.time()
        if not self.streams:
            self._close_if_drained()

    def _spend_reset(self) -> None:
        if self._closing or self.resets.spend():
            return
        limits.limited(
            "stream_resets",
            "%s resets streams faster than %.0f/s (burst %.0f): GOAWAY(ENHANCE_YOUR_CALM)",
            self.peer.get("addr"),
            self.resets.rate,
            self.resets.burst,
        )
        self.h2.send_goaway(
            self.h2.highest_inbound_stream_id, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        )
        self._flush()
        self.close()

    def _start_handlers(self) -> None:
        """Handlers start once the received batch is processed: a request
        reset in the same batch never opens a socket or starts a task."""
        if not self._starting:  # every batch of DATA: nothing to start
            return
        starting, self._starting = self._starting, []
        loop = self._loop
        for stream in starting:
            if stream.closed or self._closing:
                continue
            task = loop.create_task(self._handle(stream))
            self._handlers.add(task)
            task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        self._close_if_drained()

    async def _handle(self, stream: H2Stream) -> None:
        assert self.on_request is not None
        if stream.closed:  # reset before its handler ran: nothing to deliver
            return
        try:
            await self.on_request(self, stream)
        except Exception:
            log.exception("HBONE request handler failed")
            self.respond(stream, 503)

    # -- idle ---------------------------------------------------------------------

    def _arm_idle(self) -> None:
        if self.idle_timeout is None or self._closing:
            return
        self._idle_timer = asyncio.get_running_loop().call_later(
            self.idle_timeout / 4, self._check_idle
        )

    def _check_idle(self) -> None:
        assert self.idle_timeout is not None
        idle = asyncio.get_running_loop().time() - self.last_used
        if not self.streams and not self._handlers and idle >= self.idle_timeout:
            log.info("HBONE connection from %s idle %.0f s: closing", self.peer.get("addr"), idle)
            self.close()
            return
        self._arm_idle()

    # -- sending ----------------------------------------------------------------

    def _flush(self) -> None:
        h = self.h2
        if not h._out and not h._data_to_send:  # after most received batches
            return
        out = h.chunks_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            if len(out) == 1:
                self.transport.write(out[0])
            else:
                self.transport.writelines(_coalesce(out))

    def flush_stream(self, s: H2Stream, size: int = 0) -> None:
        """A stream's app wrote `size` bytes (or ended): frame them now.  A
        bulk write is written once this turn of the loop's callbacks is
        done, so that what several of them produce goes out as one TLS write
        and one syscall; anything written in the turn after it joins it.  A
        small one with nothing scheduled goes out at once: deferring it cost
        a message ~2.5 us (a loop callback) and bought nothing."""
        self._send_pending(s)
        if self._flush_soon:
            return
        if size < DEFER_FLUSH_MIN:
            self._flush()
            return
        self._flush_soon = True
        self._loop.call_soon(self._flush_later)

    def _flush_later(self) -> None:
        self._flush_soon = False
        self._flush()

    def _send_pending(self, s: H2Stream) -> None:
        """Send as much of the stream's buffer as the windows allow."""
        if s.closed or self._write_paused:
            return
        try:
            while s._pending:
                window = self.h2.local_flow_control_window(s.id)
                if window <= 0:
                    return
                chunk = s._pending[0]
                size = min(len(chunk), window, self.h2.max_outbound_frame_size)
                if size < len(chunk):
                    s._pending[0] = chunk[size:]
                    chunk = chunk[:size]
                else:
                    s._pending.popleft()
                s._pending_bytes -= len(chunk)
                self.h2.send_data(s.id, chunk)
            s._drained.set()
            if s._eof_pending:
                s._eof_pending = False
                self.h2.end_stream(s.id)
                self._maybe_forget(s)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
            self.streams.pop(s.id, None)
            s._closed(StreamReset(str(e)))
            self._stream_gone()

    def _maybe_forget(self, s: H2Stream) -> None:
        with contextlib.suppress(KeyError):
            st = self.h2.streams[s.id]
            if st.closed:
                self.streams.pop(s.id, None)
                s._closed(None)
                self._stream_gone()
                return
        if s.id not in self.h2.streams:
            self.streams.pop(s.id, None)
            s._closed(None)
            self._stream_gone()

    def ack(self, stream_id: int, n: int) -> None:
        if n <= 0:
            return
        if self._batching:
            self._acks[stream_id] = self._acks.get(stream_id, 0) + n
            return
        self.h2.acknowledge_received_data(n, stream_id)
        self._flush()

    def reset_stream(self, stream_id: int, code: int) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.h2.reset_stream(stream_id, code)
        self._flush()
        s = self.streams.pop(stream_id, None)
        if s is not None:
            s._closed(StreamReset(f"stream reset (code {code})"))
            self._stream_gone()

    # -- client API -------------------------------------------------------------

    def open_stream(self, headers: list[tuple[str, str]], early: bytes = b"") -> H2Stream:
        """Send the request; `early` (bytes the app already sent) goes out
        with it as DATA, in the same write, instead of after the response."""
        if self.draining or self._closing:
            raise StreamReset("connection is draining (GOAWAY)")
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, headers)
        s = H2Stream(self, sid, headers)
        self.streams[sid] = s
        if early:
            s._queue(early)
            self._send_pending(s)
        self._flush()
        self.last_used = self._loop.time()
        return s

    def available(self) -> bool:
        return (
            self.transport is not None
            and not self.transport.is_closing()
            and not self.draining
            and not self._closing
            and self.h2.open_outbound_streams
            < min(MAX_STREAMS, self.h2.remote_settings.max_concurrent_streams)
        )

    # -- server API -------------------------------------------------------------

    def respond(self, stream: H2Stream, status: int, end: bool | None = None) -> None:
        """Answer a request; any status but 200 also ends the stream.  An
        ended answer is followed by RST_STREAM(NO_ERROR) (RFC 9113 §8.1: the
        client may stop sending) unless the client has ended its side too:
        otherwise the stream stays half-closed until the client ends it, and
        a client that never does (one that keeps the connection for other
        streams) held one of MAX_STREAMS slots and an H2Stream per refused
        request, for the life of the connection."""
        if stream.closed:
            return
        end_stream = status != 200 if end is None else end
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.h2.send_headers(stream.id, [(":status", str(status))], end_stream=end_stream)
            st = self.h2.streams.get(stream.id)
            if end_stream and st is not None and not st.closed:
                self.h2.reset_stream(stream.id, h2.errors.ErrorCodes.NO_ERROR)
        self._flush()
        if end_stream:
            self._maybe_forget(stream)

    async def drain(self, ping_wait: float = DRAIN_PING_WAIT) -> None:
        """Graceful shutdown as Go's and Envoy's servers do it (RFC 9113 §6.8):
        GOAWAY(NO_ERROR, 2^31-1) so the peer stops opening streams, a PING
        round trip (or ping_wait) for streams already in flight to arrive,
        GOAWAY(NO_ERROR, the real last id), then the open streams run to their
        end and the connection closes with TLS close_notify."""
        if self.draining or self._closing:
            self._start_draining()
            return
        self.draining = True
        for cb in self.on_goaway:
            cb()
        self.h2.send_goaway(LAST_STREAM_ID)
        payload = os.urandom(8)
        acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ping = (payload, acked)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.ping(payload)
        self._flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(acked), ping_wait)
        if self._closing:
            return
        self.h2.send_goaway(self.h2.highest_inbound_stream_id)
        self._flush()
        self._close_if_drained()

    def close(self) -> None:
        """Close now: GOAWAY (unless one went already), then the TLS
        close_notify (the SSL transport's close sends it; abort would not)."""
        if self._closing:
            return
        self._closing = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self.h2.goaway_sent is None:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection()
        self._flush()
        if self.transport is not None:
            self.transport.close()


def _coalesce(pieces: list[bytes]) -> list[bytes]:
    """Runs of small pieces (control frames, DATA headers, small DATA) joined
    into one: the TLS transport makes a record of every piece it is given, and
    a peer reading one record should see the whole batch of control frames
    (our SETTINGS, say) at once.  Large payloads stay separate objects (not
    copied); their 9-byte header joins the small run before them."""
    out: list[bytes] = []
    small: list[bytes] = []
    for p in pieces:
        if len(p) < JOIN_BELOW:
            small.append(p)
            continue
        if small:
            out.append(b"".join(small))
            small = []
        out.append(p)
    if small:
        out.append(b"".join(small))
    return out


# Every open HBONE connection of this process, per event loop (a loop's
# connections are drained on it; agent/tunnel/loops.py).  Each loop changes
# only its own set.
_live: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, weakref.WeakSet[H2Conn]] = (
    weakref.WeakKeyDictionary()
)


def live_count(loop: asyncio.AbstractEventLoop) -> int:
    """How many HBONE connections `loop` serves (read from any thread)."""
    live = _live.get(loop)
    return len(live) if live is not None else 0


def _live_here() -> weakref.WeakSet[H2Conn]:
    loop = asyncio.get_running_loop()
    live = _live.get(loop)
    if live is None:
        live = _live[loop] = weakref.WeakSet()
    return live


async def drain_all(timeout: float) -> None:
    """Drain every HBONE connection of this event loop (agent shutdown, end
    of a handoff; with more than one loop the agent runs this on each):
    graceful GOAWAYs, streams finish within `timeout`, then each connection
    closes with close_notify, waited for up to CLOSE_WAIT."""
    conns = list(_live_here())
    if not conns:
        return
    log.info("draining %d HBONE connections", len(conns))
    await asyncio.gather(*(c.drain() for c in conns), return_exceptions=True)
    pending = [c.closed for c in conns if not c.closed.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)
    for c in conns:
        c.close()
    pending = [c.closed for c in conns if not c.closed.done()]
    if pending:
        await asyncio.wait(pending, timeout=CLOSE_WAIT)
