"""The worker's request framing (textgen/server/framing.py) without a server: the same verdict
however the bytes are split, and work in proportion to the bytes received."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from textgen.server.framing import MAX_HEAD_BYTES, Framer, Verdict

MAX_BODY = 4096
HEAD = b"POST /generate?x=1 HTTP/1.1\r\nHost: t\r\n"


def chunked(*parts: bytes, trailer: bytes = b"") -> bytes:
    body = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts)
    return HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n" + trailer + b"\r\n"


REQUESTS = [
    b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n",
    HEAD + b'Content-Length: 11\r\n\r\n{"a": true}',
    HEAD + b'Content-Length: 11\r\nExpect: 100-continue\r\n\r\n{"a": true}',
    HEAD + b"Content-Length: 5000\r\n\r\n",  # over the limit
    HEAD + b"Content-Length: 1, 2\r\n\r\n",  # passed on for gunicorn to refuse
    chunked(b'{"a":', b" true}"),
    chunked(b"x" * 300, b"y", trailer=b"X-T: 1\r\n"),
    chunked(b"x" * 3000, b"y" * 2000),  # over the limit
    HEAD + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a": true}\r\n0\r\n\r\n',  # malformed
    HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",  # malformed size
    HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"1" * 2000,  # a size line never ends
    b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD_BYTES + 10),  # headers too large
    HEAD + b'Content-Length: 11\r\n\r\n{"a": 1}',  # incomplete
]


def whole(data: bytes) -> Verdict:
    return Framer(MAX_BODY).feed(data)


def in_pieces(data: bytes, cuts: list[int]) -> Verdict:
    """Feed ``data`` cut at ``cuts``; the first verdict that is not "more", else the last."""
    framer = Framer(MAX_BODY)
    verdict = Verdict()
    edges = [0, *sorted(set(cuts)), len(data)]
    for start, end in zip(edges, edges[1:], strict=False):
        verdict = framer.feed(data[start:end])
        if verdict.complete or verdict.status is not None:
            break
    return verdict


@settings(max_examples=400, derandomize=True, database=None)
@given(st.data())
def test_any_split_gives_the_whole_requests_verdict(data: st.DataObject) -> None:
    request = data.draw(st.sampled_from(REQUESTS))
    cuts = data.draw(st.lists(st.integers(0, len(request)), max_size=40))
    assert in_pieces(request, cuts) == whole(request)


def test_verdicts() -> None:
    assert whole(REQUESTS[0]) == Verdict(complete=True, data=REQUESTS[0])
    assert whole(REQUESTS[1]).data == REQUESTS[1]
    # The 100-continue has been answered by the worker: gunicorn does not see it.
    assert whole(REQUESTS[2]).data == REQUESTS[1].replace(b"11\r\n", b"11\r\n", 1)
    assert whole(REQUESTS[3]).status == 413
    assert whole(REQUESTS[4]).complete
    assert whole(REQUESTS[5]).complete and whole(REQUESTS[6]).complete
    assert [whole(r).status for r in REQUESTS[7:12]] == [413, 400, 400, 400, 431]
    assert whole(REQUESTS[12]) == Verdict()


def test_the_request_line_is_known_once_the_head_is() -> None:
    framer = Framer(MAX_BODY)
    framer.feed(HEAD + b"Content-Length: 3\r\n\r\n")
    assert framer.method_and_path == (b"POST", b"/generate")


@pytest.mark.parametrize("kind", ["content-length", "chunked", "headers"])
def test_a_request_sent_a_byte_at_a_time_is_examined_in_linear_work(kind: str) -> None:
    """A client that sends one byte per packet must not make the worker's loop re-read what it
    already judged (quadratic in the request's size)."""
    body = b"x" * 60_000
    if kind == "content-length":
        request = HEAD + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    elif kind == "chunked":
        request = chunked(*[body[i : i + 7] for i in range(0, len(body), 7)])
    else:
        request = b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 7000 + b"\r\n"
    framer = Framer(1 << 20)
    verdicts = [framer.feed(request[i : i + 1]) for i in range(len(request))]
    assert verdicts[-1].complete and not any(v.complete for v in verdicts[:-1])
    # Each byte is looked at a bounded number of times: the last three again with the next
    # byte (the head's end may span two pieces). Judged afresh each time, it would be 10^9.
    assert framer.examined <= 4 * len(request)
