"""Where an HTTP/1.1 request ends, judged from the bytes received so far, without blocking.

The worker reads whole requests on its main loop before a thread takes them; this says when
it has one (or why it never will). Framing it does not understand is passed on as it is, for
gunicorn's parser to answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HEAD_END = b"\r\n\r\n"
MAX_HEAD_BYTES = 64 * 1024
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


def judge(buffer: bytes, max_body: int) -> Verdict:
    """The verdict on a request whose bytes so far are ``buffer``."""
    end = buffer.find(HEAD_END)
    if end < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            return Verdict(status=431, message=f"request headers exceed {MAX_HEAD_BYTES} bytes")
        return MORE
    if end > MAX_HEAD_BYTES:
        return Verdict(status=431, message=f"request headers exceed {MAX_HEAD_BYTES} bytes")
    head, rest = buffer[:end], buffer[end + len(HEAD_END) :]
    fields = header_fields(head)
    encodings = fields.get(b"transfer-encoding", [])
    lengths = fields.get(b"content-length", [])
    head = without_expect_continue(head, fields)
    whole = head + HEAD_END
    if encodings:
        if len(encodings) != 1 or encodings[0].strip().lower() != b"chunked" or lengths:
            return Verdict(complete=True, data=whole + rest)  # gunicorn refuses it
        size = chunked_end(rest, max_body)
        if size == -2:
            return Verdict(status=413, message=f"the body exceeds {max_body} bytes")
        if size == -3:
            return Verdict(status=400, message="the chunked body is malformed")
        return MORE if size < 0 else Verdict(complete=True, data=whole + rest)
    if not lengths:
        return Verdict(complete=True, data=whole + rest)
    if len(lengths) != 1 or not lengths[0].strip().isdigit() or not lengths[0].strip().isascii():
        return Verdict(complete=True, data=whole + rest)
    length = int(lengths[0])
    if length > max_body:
        return Verdict(status=413, message=f"the body has {length} bytes; at most {max_body}")
    return MORE if len(rest) < length else Verdict(complete=True, data=whole + rest)


def header_fields(head: bytes) -> dict[bytes, list[bytes]]:
    """Field values by lower-cased name (the request line skipped)."""
    fields: dict[bytes, list[bytes]] = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            fields.setdefault(name.strip().lower(), []).append(value.strip())
    return fields


def without_expect_continue(head: bytes, fields: dict[bytes, list[bytes]]) -> bytes:
    """The head without ``Expect: 100-continue``: the worker has answered it already."""
    if [v.lower() for v in fields.get(b"expect", [])] != [b"100-continue"]:
        return head
    lines = head.split(b"\r\n")
    kept = [line for line in lines if line.partition(b":")[0].strip().lower() != b"expect"]
    return b"\r\n".join(kept)


def expects_continue(buffer: bytes) -> bool:
    """Whether a head (complete, before its body) asks for ``100 Continue``."""
    end = buffer.find(HEAD_END)
    values = header_fields(buffer[:end]).get(b"expect", []) if end >= 0 else []
    return [v.lower() for v in values] == [b"100-continue"]


def chunked_end(body: bytes, max_body: int) -> int:
    """Where a chunked body ends (its length on the wire), -1 if not yet, -2 if its data
    exceed ``max_body``, -3 if malformed."""
    position, data = 0, 0
    while True:
        line_end = body.find(b"\r\n", position)
        if line_end < 0:
            return -3 if len(body) - position > 1024 else -1
        match = _CHUNK_SIZE.fullmatch(body, position, line_end + 2)
        if match is None:
            return -3
        size = int(match.group(1), 16)
        data += size
        if data > max_body:
            return -2
        position = line_end + 2
        if size == 0:
            break
        if len(body) < position + size + 2:
            return -1
        if body[position + size : position + size + 2] != b"\r\n":
            return -3
        position += size + 2
    # Trailer fields, then an empty line.
    while True:
        line_end = body.find(b"\r\n", position)
        if line_end < 0:
            return -3 if len(body) - position > MAX_HEAD_BYTES else -1
        if line_end == position:
            return line_end + 2
        position = line_end + 2
