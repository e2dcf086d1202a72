"""Stream samples out of a JSON array or JSONL file without loading the file into memory.

The format is detected from the first non-blank character ('[' = JSON array, else JSONL), so
the extension does not matter. Yields (index, record) where record is the parsed JSON value or a
SampleError for a line that is not valid JSON (the caller decides whether to skip it). A broken
JSON array cannot be resynchronised, so its syntax error is raised.
"""
from __future__ import annotations

import json
from typing import Iterator

from .samples import SampleError

_CHUNK = 1 << 20
_WHITESPACE = " \t\r\n"
_DELIMITERS = _WHITESPACE + ",]"


def read_records(path: str) -> Iterator[tuple[int, object]]:
    with open(path, "r", encoding="utf-8") as f:
        head = ""
        while True:
            chunk = f.read(_CHUNK)
            head += chunk
            if not chunk or head.lstrip(_WHITESPACE + "\ufeff"):
                break
        first = head.lstrip(_WHITESPACE + "\ufeff")[:1]
        if first == "[":
            yield from _json_array(path, f, head)
        else:
            yield from _jsonl(path, f, head)


def _jsonl(path: str, f, head: str) -> Iterator[tuple[int, object]]:
    index = 0
    rest = ""
    for chunk in _chunks(f, head):
        lines = (rest + chunk).split("\n")
        rest = lines.pop()
        for line in lines:
            if line.strip():
                yield index, _parse_line(path, index, line)
                index += 1
    if rest.strip():
        yield index, _parse_line(path, index, rest)


def _parse_line(path: str, index: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return SampleError(path, index, "json", f"invalid JSON line: {e}")


def _chunks(f, head: str):
    yield head
    while chunk := f.read(_CHUNK):
        yield chunk


def _json_array(path: str, f, head: str) -> Iterator[tuple[int, object]]:
    decoder = json.JSONDecoder()
    buf, pos = head.lstrip(_WHITESPACE + "\ufeff")[1:], 0  # after '['
    eof = False
    index = 0

    def more() -> bool:
        nonlocal buf, pos, eof
        chunk = f.read(max(_CHUNK, len(buf)))  # grow geometrically for very large values
        eof = not chunk
        buf, pos = buf[pos:] + chunk, 0
        return not eof

    def skip_ws():
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in _WHITESPACE:
                pos += 1
            if pos < len(buf) or not more():
                return

    def fail(problem: str):
        raise SampleError(path, index, "json", problem)

    skip_ws()
    if buf[pos:pos + 1] == "]":
        return
    while True:
        skip_ws()
        while True:
            try:
                value, end = decoder.raw_decode(buf, pos)
                # a number cut by the buffer's end ("12" of "12.5") decodes short: trust a value
                # only when a delimiter follows it
                if eof or (end < len(buf) and buf[end] in _DELIMITERS):
                    break
            except json.JSONDecodeError as e:
                if eof:
                    fail(f"invalid JSON array: {e.msg}")
            more()
        pos = end
        yield index, value
        index += 1
        skip_ws()
        sep = buf[pos:pos + 1]
        pos += 1
        if sep == "]":
            return
        if sep != ",":
            fail(f"invalid JSON array: expected ',' or ']' after sample, got {sep or 'end of file'!r}")
