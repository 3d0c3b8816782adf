"""The shortest text that completes a JSON prefix (pure; used to end JSON within its budget)."""

from __future__ import annotations


def closing_suffix(prefix: str) -> str:
    """A short continuation that makes ``prefix`` (the start of a JSON value) complete.

    Strings are closed, a missing value becomes 0, a dangling key gets ``:0``, and open
    arrays and objects are closed innermost first. A half-written literal (``tr``) is
    treated as finished; the grammar then rules out what cannot follow it.
    """
    stack: list[str] = []
    in_string = escape = is_key = False
    expect = "value"  # value | key_or_close | key | colon | after_value | value_or_close | scalar
    for char in prefix:
        if in_string:
            if escape:
                escape = False
            elif char == "\\":
                escape = True
            elif char == '"':
                in_string = False
                expect = "colon" if is_key else "after_value"
            continue
        if char == '"':
            in_string, is_key = True, expect in ("key", "key_or_close")
        elif char in "{[":
            stack.append(char)
            expect = "key_or_close" if char == "{" else "value_or_close"
        elif char in "}]":
            if stack:
                stack.pop()
            expect = "after_value"
        elif char == ":":
            expect = "value"
        elif char == ",":
            expect = "key" if stack and stack[-1] == "{" else "value"
        elif not char.isspace() and expect in ("value", "value_or_close"):
            expect = "scalar"
    out = ""
    if in_string:
        out += ("n" if escape else "") + '"'
        expect = "colon" if is_key else "after_value"
    out += {"colon": ":0", "value": "0", "key": '"":0'}.get(expect, "")
    return out + "".join("}" if c == "{" else "]" for c in reversed(stack))
