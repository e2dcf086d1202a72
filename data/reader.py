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
    """Text of a binary file in chunks: UTF-8, or UTF-16/32 when a byte-order mark says so (a
    leading BOM dropped); CRLF and lone CR (old Mac editors) read as LF. Bytes that cannot be
    decoded raise SampleError with their line; a compressed or binary container says what it is."""

    def __init__(self, path: str, f):
        self.path, self.f = path, f
        self.decoder = None  # chosen from the first bytes
        self.encoding = "utf-8-sig"
        self.newlines = 0  # in the text decoded so far
        self.cr = False  # the last chunk ended in '\r' (its '\n' may start the next)

    def _start(self, data: bytes):
        for magic, what in _CONTAINERS:
            if data.startswith(magic):
                raise SampleError(self.path, None, None, f"is {what}, not JSON/JSONL text: {_UNPACK[what]}", line=1)
        self.encoding = bom_encoding(data) or self.encoding
        self.decoder = codecs.getincrementaldecoder(self.encoding)()

    def read(self) -> str:
        """The next piece of text; "" only at the end of the file."""
        text = ""
        while not text:
            data = self.f.read(_CHUNK)
            if self.decoder is None:
                self._start(data)
            try:
                text = self.decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                line = self.newlines + e.object.count(b"\n", 0, e.start) + 1
                name = "UTF-8" if self.encoding == "utf-8-sig" else self.encoding.upper()
                raise SampleError(self.path, None, None, f"byte 0x{e.object[e.start]:02x} is not {name} "
                                  f"({e.reason}); save the file as UTF-8", line=line) from None
            text = ("\r" if self.cr else "") + text
            self.cr = bool(data) and text.endswith("\r")  # hold it back: a "\r\n" may be split across chunks
            if self.cr:
                text = text[:-1]
            if "\r" in text:  # JSON strings cannot hold a raw CR, so every one ends a line
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            if not data:
                break
        self.newlines += text.count("\n")
        return text


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def bom_encoding(data: bytes) -> str | None:
    """The encoding a byte-order mark at the start of `data` names (UTF-8, UTF-16/32 LE/BE); None
    without one (data files here, config files in engine/config.py)."""
    for bom, name in _BOMS:  # UTF-32 LE's BOM starts with UTF-16 LE's: listed first
        if data.startswith(bom):
            return name
    return None


_CONTAINERS = ((b"\x1f\x8b", "gzip-compressed"), (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
               (b"\xfd7zXZ\x00", "xz-compressed"), (b"BZh", "bzip2-compressed"), (b"PK\x03\x04", "a zip archive"),
               (b"PAR1", "a Parquet file"), (b"\x93NUMPY", "a NumPy array"))
_UNPACK = {"gzip-compressed": "decompress it first (gunzip -k)", "zstd-compressed": "decompress it first (zstd -d)",
           "xz-compressed": "decompress it first (unxz -k)", "bzip2-compressed": "decompress it first (bunzip2 -k)",
           "a zip archive": "unzip it and list the files",
           "a Parquet file": "convert it to JSONL (e.g. pandas.read_parquet(f).to_json(out, orient='records', lines=True))",
           "a NumPy array": "give the JSON/JSONL samples it was made from"}


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
        value = json.loads(line)
    except json.JSONDecodeError as e:
        if "\x00" in line:
            return SampleError(path, index, "json", "holds NUL bytes (a UTF-16 file without a byte-order mark, or "
                               "binary data?); save the file as UTF-8", line=line_no)
        return SampleError(path, index, "json", f"not valid JSON: {e.msg} (column {e.colno}; one sample per "
                           "line, or one JSON array)", line=line_no)
    except RecursionError:
        return SampleError(path, index, "json", "nested too deeply", line=line_no)
    return _no_lone_surrogate(path, index, value, line_no, "\\u" in line)


def _no_lone_surrogate(path: str, index: int, value, line_no: int, escaped: bool = True):
    """`value`, or a SampleError when one of its strings holds half of a UTF-16 surrogate pair (a JSON
    escape like \\ud83d cut from its partner): no UTF-8 text, so no tokenizer takes it. Only escapes
    produce them, so lines without a \\u skip the walk."""
    if not escaped:
        return value
    stack = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                return SampleError(path, index, where.lstrip(".") or None, f"holds a lone UTF-16 surrogate "
                                   f"(\\u{ord(item[e.start]):04x}, half of an escaped pair); fix or drop the "
                                   "sample", line=line_no)
        elif isinstance(item, dict):
            stack += [(v, f"{where}.{k}") for k, v in item.items()]
        elif isinstance(item, list):
            stack += [(v, f"{where}[{i}]") for i, v in enumerate(item)]
    return value


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
            yield index, _no_lone_surrogate(path, index, value, line_of(pos)), line_of(pos)
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
