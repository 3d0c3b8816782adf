"""Where an HTTP/1.1 request ends, judged as its bytes arrive, without blocking.

The worker reads whole requests on its main loop before a thread takes them; a ``Framer`` says
when it has one (or why it never will). It resumes where the last bytes left it, so a client
that sends a request in many small pieces costs the loop time in proportion to the bytes, not
to their square (each byte is examined once, the last few again with the next piece).
Framing it does not understand is passed on as it is, for gunicorn's parser to answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HEAD_END = b"\r\n\r\n"
MAX_HEAD_BYTES = 64 * 1024
MAX_CHUNK_LINE = 1024
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(;[^\r\n]*)?\r\n")


@dataclass(frozen=True)
class Verdict:
    """``complete``: the request is all here (``data`` is what to hand on). Otherwise
    ``status`` says why it is refused, or both are unset while more bytes are needed."""

    complete: bool = False
    data: bytes = b""
    status: int | None = None
    message: str = ""


MORE = Verdict()


class Framer:
    """One request's bytes so far and what is known of its framing."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.buffer = bytearray()
        self.body_start = -1  # where the body begins, once the head is complete
        self.head = b""  # the head without ``Expect: 100-continue``
        self.expects_continue = False
        self.length: int | None = None  # Content-Length
        self.chunks: ChunkedBody | None = None  # Transfer-Encoding: chunked
        self.examined = 0  # bytes looked at, for the tests of the cost above

    @property
    def method_and_path(self) -> tuple[bytes, bytes]:
        """The request line's method and path (without the query), once the head is here."""
        method, _, rest = self.head.partition(b"\r\n")[0].partition(b" ")
        return method, rest.partition(b" ")[0].partition(b"?")[0]

    def feed(self, data: bytes) -> Verdict:
        """The verdict once ``data`` has arrived after what came before."""
        searched = len(self.buffer)
        self.buffer += data
        if self.body_start < 0:
            verdict = self.find_head(max(0, searched - len(HEAD_END) + 1))
            if verdict is not None:
                return verdict
        if self.chunks is not None:
            return self.chunk_verdict()
        if self.length is not None and len(self.buffer) - self.body_start < self.length:
            return MORE
        return self.complete(len(self.buffer))

    def find_head(self, start: int) -> Verdict | None:
        """Look for the head's end from ``start``: a verdict, or None once the head is known
        and the body decides."""
        end = self.buffer.find(HEAD_END, start)
        self.examined += (len(self.buffer) if end < 0 else end + len(HEAD_END)) - start
        too_long = Verdict(status=431, message=f"request headers exceed {MAX_HEAD_BYTES} bytes")
        if end < 0:
            return too_long if len(self.buffer) > MAX_HEAD_BYTES else MORE
        if end > MAX_HEAD_BYTES:
            return too_long
        self.body_start = end + len(HEAD_END)
        head = bytes(self.buffer[:end])
        fields = header_fields(head)
        self.expects_continue = is_continue(fields)
        self.head = without_expect(head) if self.expects_continue else head
        encodings = fields.get(b"transfer-encoding", [])
        lengths = fields.get(b"content-length", [])
        if encodings:
            if len(encodings) != 1 or encodings[0].strip().lower() != b"chunked" or lengths:
                return self.complete(len(self.buffer))  # gunicorn refuses it
            self.chunks = ChunkedBody(self.body_start)
            return None
        if len(lengths) != 1:
            return self.complete(len(self.buffer))  # no body, or gunicorn refuses it
        value = lengths[0].strip()
        if not value.isdigit() or not value.isascii():
            return self.complete(len(self.buffer))
        self.length = int(value)
        if self.length > self.max_body:
            return Verdict(
                status=413, message=f"the body has {self.length} bytes; at most {self.max_body}"
            )
        return None

    def chunk_verdict(self) -> Verdict:
        assert self.chunks is not None
        before = self.chunks.examined
        end = self.chunks.advance(self.buffer, self.max_body)
        self.examined += self.chunks.examined - before
        if end == TOO_LARGE:
            return Verdict(status=413, message=f"the body exceeds {self.max_body} bytes")
        if end == MALFORMED:
            return Verdict(status=400, message="the chunked body is malformed")
        return MORE if end == NOT_YET else self.complete(len(self.buffer))

    def complete(self, end: int) -> Verdict:
        body = bytes(self.buffer[self.body_start : end]) if self.body_start >= 0 else b""
        head = self.head + HEAD_END if self.body_start >= 0 else bytes(self.buffer)
        return Verdict(complete=True, data=head + body)


NOT_YET, TOO_LARGE, MALFORMED = -1, -2, -3


class ChunkedBody:
    """A chunked body parsed as it arrives: where the next line or chunk starts."""

    def __init__(self, start: int) -> None:
        self.position = start  # the next size line, chunk data or trailer line
        self.searched = start  # how far a line's end has been looked for
        self.data = 0  # data bytes so far
        self.size: int | None = None  # the current chunk's size, its data not yet all here
        self.trailer = False  # past the last chunk
        self.examined = 0

    def advance(self, buffer: bytearray, max_body: int) -> int:
        """Where the body ends in ``buffer`` (past its last byte), or NOT_YET, TOO_LARGE or
        MALFORMED."""
        while True:
            if self.size is not None:  # a chunk's data, then CRLF
                end = self.position + self.size
                if len(buffer) < end + 2:
                    return NOT_YET
                if buffer[end : end + 2] != b"\r\n":
                    return MALFORMED
                self.examined += self.size + 2
                self.position = self.searched = end + 2
                self.size = None
            line_end = buffer.find(b"\r\n", max(self.position, self.searched - 1))
            self.examined += (len(buffer) if line_end < 0 else line_end + 2) - self.searched
            if line_end < 0:
                self.searched = len(buffer)
                limit = MAX_HEAD_BYTES if self.trailer else MAX_CHUNK_LINE
                return MALFORMED if len(buffer) - self.position > limit else NOT_YET
            line_start, self.position = self.position, line_end + 2
            self.searched = self.position
            if self.trailer:  # trailer fields, then an empty line
                if line_end == line_start:
                    return self.position
                continue
            match = _CHUNK_SIZE.fullmatch(buffer, line_start, self.position)
            if match is None:
                return MALFORMED
            size = int(match.group(1), 16)
            self.data += size
            if self.data > max_body:
                return TOO_LARGE
            if size == 0:
                self.trailer = True
            else:
                self.size = size


def header_fields(head: bytes) -> dict[bytes, list[bytes]]:
    """Field values by lower-cased name (the request line skipped)."""
    fields: dict[bytes, list[bytes]] = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            fields.setdefault(name.strip().lower(), []).append(value.strip())
    return fields


def is_continue(fields: dict[bytes, list[bytes]]) -> bool:
    """Whether a head asks for ``100 Continue`` (and nothing else)."""
    return [v.lower() for v in fields.get(b"expect", [])] == [b"100-continue"]


def without_expect(head: bytes) -> bytes:
    """The head without its ``Expect`` field: the worker has answered it already."""
    lines = head.split(b"\r\n")
    kept = [line for line in lines if line.partition(b":")[0].strip().lower() != b"expect"]
    return b"\r\n".join(kept)
