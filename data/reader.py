"""Stream samples out of a JSON array or JSONL file without loading the file into memory.

The format is detected from the first non-blank character ('[' = JSON array, else JSONL), so
the extension does not matter. The file must be UTF-8; a BOM is accepted. Yields
(index, record, line) with `line` the 1-based line the sample starts on (as an editor shows it),
where record is the parsed JSON value or a SampleError for a JSONL line that is not valid JSON
(the caller decides whether to skip it). What cannot be resynchronised raises SampleError naming
the file and line: bytes that are not UTF-8, a broken JSON array, text after the array's ']'.
"""
from __future__ import annotations

import codecs
import json
from typing import Iterator

from .samples import SampleError

_CHUNK = 1 << 20
_WHITESPACE = " \t\r\n"
_DELIMITERS = _WHITESPACE + ",]"


def read_records(path: str, lines: bool = False) -> Iterator[tuple]:
    """(index, record) per sample; (index, record, line) with lines=True."""
    for index, record, line in _records(path):
        yield (index, record, line) if lines else (index, record)


def _records(path: str) -> Iterator[tuple[int, object, int]]:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise SampleError(path, None, None, f"cannot be read ({e.strerror})") from None
    with f:
        text = _Text(path, f)
        head = ""
        while not head.lstrip(_WHITESPACE) and (chunk := text.read()):
            head += chunk
        if head.lstrip(_WHITESPACE)[:1] == "[":
            yield from _json_array(path, text, head)
        else:
            yield from _jsonl(path, text, head)


class _Text:
    """UTF-8 text of a binary file in chunks (a leading BOM dropped); bytes that are not UTF-8
    raise SampleError with their line."""

    def __init__(self, path: str, f):
        self.path, self.f = path, f
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.newlines = 0  # in the text decoded so far

    def read(self) -> str:
        """The next piece of text; "" only at the end of the file."""
        text = ""
        while not text:
            data = self.f.read(_CHUNK)
            try:
                text = self.decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                line = self.newlines + e.object.count(b"\n", 0, e.start) + 1
                raise SampleError(self.path, None, None, f"byte 0x{e.object[e.start]:02x} is not UTF-8 "
                                  f"({e.reason}); save the file as UTF-8", line=line) from None
            if not data:
                break
        self.newlines += text.count("\n")
        return text


def _jsonl(path: str, text: _Text, head: str) -> Iterator[tuple[int, object, int]]:
    index, line_no, rest = 0, 0, ""
    chunk = head
    while True:
        lines = (rest + chunk).split("\n")
        rest = lines.pop()
        for line in lines:
            line_no += 1
            if line.strip():
                yield index, _parse_line(path, index, line, line_no), line_no
                index += 1
        if not chunk:
            break
        chunk = text.read()
    if rest.strip():
        yield index, _parse_line(path, index, rest, line_no + 1), line_no + 1


def _parse_line(path: str, index: int, line: str, line_no: int):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return SampleError(path, index, "json", f"not valid JSON: {e.msg} (column {e.colno}; one sample per "
                           "line, or one JSON array)", line=line_no)
    except RecursionError:
        return SampleError(path, index, "json", "nested too deeply", line=line_no)


def _json_array(path: str, text: _Text, head: str) -> Iterator[tuple[int, object, int]]:
    decoder = json.JSONDecoder()
    start = head.index("[")
    buf, pos = head[start + 1:], 0  # after '['
    line_at, line_pos = head.count("\n", 0, start) + 1, 0  # buf[line_pos] is on line line_at
    eof = False
    index = 0

    def line_of(p: int) -> int:
        nonlocal line_at, line_pos
        line_at += buf.count("\n", line_pos, p)
        line_pos = p
        return line_at

    def more() -> bool:
        nonlocal buf, pos, eof, line_pos
        line_of(pos)
        chunk = text.read()
        while chunk and len(chunk) < len(buf):  # grow geometrically for very large values
            chunk += (nxt := text.read())
            if not nxt:
                break
        eof = not chunk
        buf, pos, line_pos = buf[pos:] + chunk, 0, 0
        return not eof

    def skip_ws():
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in _WHITESPACE:
                pos += 1
            if pos < len(buf) or not more():
                return

    def fail(problem: str, at: int):
        raise SampleError(path, index, None, problem, line=line_of(at))

    skip_ws()
    if buf[pos:pos + 1] == "]":
        pos += 1
    else:
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
                        fail(f"invalid JSON array: {e.msg}", e.pos)
                except RecursionError:
                    fail("nested too deeply", pos)
                more()
            yield index, value, line_of(pos)
            pos = end
            index += 1
            skip_ws()
            sep = buf[pos:pos + 1]
            if sep not in (",", "]"):
                fail(f"invalid JSON array: expected ',' or ']' after sample, got {sep or 'end of file'!r}", pos)
            pos += 1
            if sep == "]":
                break
    skip_ws()
    if pos < len(buf):
        index = None
        fail(f"unexpected {buf[pos:pos + 20]!r} after the JSON array's closing ']'", pos)
