"""The exceptions every store refusal raises, and `one_line` for errors that crossed a process."""

from __future__ import annotations

import re


class StoreError(Exception):
    """A store cannot be written or read as asked; the message names the store and the problem."""


class DamagedData(StoreError):
    """Bytes of a store fail their checksum (or are missing) where a reader needs them.

    The message names the store, the array or tar member, the row and the file. Readers opened
    with ``on_damage="skip"`` catch it per sample, leave the sample out and record the message.
    """


_WRAPPED = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\s*\nOriginal Traceback \(most recent call last\):\n",
                      re.MULTILINE)
_FRAME = re.compile(r"^  File \".*\", line \d+", re.MULTILINE)
_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:: |$)")


def one_line(exc: BaseException) -> str:
    """The message a user should see for `exc`.

    torch re-raises an error from a DataLoader worker in the main process as the same exception
    type whose message is "Caught X in DataLoader worker process N. Original Traceback ..." plus
    the worker's whole traceback. For such an error this returns the original message (the text
    after "module.X: " in the traceback's last exception); for any other error `str(exc)`.
    """
    text = str(exc)
    m = _WRAPPED.search(text)
    if m is None:
        return text
    tb = text[m.end():]
    frames = list(_FRAME.finditer(tb))
    if not frames:
        return text
    # after the last frame: its source lines (indented), then the exception line(s)
    lines = tb[frames[-1].end():].split("\n")[1:]
    i = 0
    while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
        i += 1
    body = "\n".join(lines[i:]).rstrip("\n")
    head = _EXC_LINE.match(body)
    if head is None:
        return body or text
    return body[head.end():] if head.group(0).endswith(": ") else body[head.end():].lstrip("\n")
