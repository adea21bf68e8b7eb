"""Protobuf's text-format parser, run in memory proportional to the text.

``google.protobuf.text_format`` is the parser Caffe's prototxt files need (same grammar,
same messages), but three things in it make a hostile file within the size limit cost
gigabytes:

- its whitespace regex ``(\\s|(#.*$))+`` repeats a group once per character, and Python's
  ``re`` keeps backtracking state for each repetition: a line of 60 M spaces took 9.6 GB;
- its string regex does the same once per escape sequence (``"\\n\\n\\n..."``);
- ``Parse`` splits the whole text into a list of lines first.

:class:`Tokenizer` replaces those regexes with forms that match the same text in constant
memory (one repetition per whitespace run; for strings, possessive repeats, so Python 3.11+),
and reads lines one at a time, skipping blank and comment-only lines in C (their line numbers
still count, so ``file:line:col`` stays exact).  :class:`_Parser` refuses, as it goes,
nesting deeper than :data:`MAX_DEPTH` and any list longer than its limit (``max_layers`` for a
net's layers, ``max_list_length`` for every other repeated field), so ten million
``layer {}`` blocks are refused at the 100,001st instead of built.
"""
from __future__ import annotations

import re
import sys
from typing import Iterator, List, Tuple

from google.protobuf import text_format

from caffe_compat import limits
from caffe_compat.errors import LimitError, ParseError
from caffe_compat.proto_text import is_repeated

__all__ = ["MAX_DEPTH", "parse", "line_at"]

#: nesting depth of messages in a text file (Caffe's messages nest a few levels; protobuf
#: recommends 100 for untrusted text, the depth its binary parser allows)
MAX_DEPTH = 100

#: a line holding a token: not only whitespace (``\n`` aside: lines end there) and perhaps a comment
_CONTENT_LINE = re.compile(r"^(?![^\S\n]*(?:#|$)).*$", re.MULTILINE)


def _content_lines(text: str) -> Iterator[Tuple[int, str]]:
    """``(0-based line number, line)`` of each line holding a token, in order; blank and
    comment-only lines are skipped by the regex engine (no Python work per skipped line)."""
    line = 0
    pos = 0
    for m in _CONTENT_LINE.finditer(text):
        line += text.count("\n", pos, m.start())
        pos = m.start()
        yield line, m.group(0)


def line_at(text: str, line: int) -> str:
    """Line ``line`` (1-based, lines split at ``\\n`` as the tokenizer splits them) of
    ``text``, without building a list of all lines; '' when there is none."""
    if line < 1:
        return ""
    pos, seen = 0, 0
    step = 1 << 20
    while seen < line - 1:  # skip whole chunks by counting their newlines in C
        chunk_end = min(len(text), pos + step)
        n = text.count("\n", pos, chunk_end)
        if seen + n >= line - 1 or chunk_end == len(text):
            break
        seen += n
        pos = chunk_end
    while seen < line - 1:
        nl = text.find("\n", pos)
        if nl < 0:
            return ""
        pos = nl + 1
        seen += 1
    end = text.find("\n", pos)
    return text[pos:] if end < 0 else text[pos:end]


if sys.version_info >= (3, 11):
    # a quoted string: runs of plain characters or one escape each, possessively (the same
    # language as protobuf's pattern, without a backtracking frame per escape)
    _STRING = r"{qt}(?:[^{qt}\n\\]++|\\.)*+(?:{qt}|\\?$)"
else:  # no possessive repeats before 3.11: protobuf's own pattern (memory grows per escape)
    _STRING = r"{qt}[^{qt}\n\\]*((\\.)+[^{qt}\n\\]*)*({qt}|\\?$)"


class Tokenizer(text_format.Tokenizer):
    """protobuf's tokenizer with constant-memory regexes, fed one content line at a time."""

    # one repetition per whitespace run or comment, not per character
    _WHITESPACE = re.compile(r"\s+")
    _WHITESPACE_OR_COMMENT = re.compile(r"(?:\s+|#.*$)+", re.MULTILINE)
    _TOKEN = re.compile("|".join(
        [r"[a-zA-Z_][0-9a-zA-Z_+-]*",            # an identifier
         r"(?:[0-9+-]|\.[0-9])[0-9a-zA-Z_.+-]*"]  # a number
        + [_STRING.format(qt=q) for q in ("'", '"')]))

    def __init__(self, text: str):
        self._numbered = _content_lines(text)
        super().__init__(())

    def _PopLine(self) -> None:
        while len(self._current_line) <= self._column:
            try:
                self._line, self._current_line = next(self._numbered)
            except StopIteration:
                self._current_line = ""
                self._more_lines = False
                return
            self._column = 0

    def position(self) -> Tuple[int, int]:
        """(line, column), 1-based, of the current token."""
        return self._line + 1, self._column + 1


class _Parser(text_format._Parser):  # pylint: disable=protected-access
    """protobuf's parser with bounded nesting and list lengths, on :class:`Tokenizer`."""

    def __init__(self, filename: str, **kw):
        super().__init__(**kw)
        self.filename = filename
        self._counts: List[dict] = [{}]  # per open message: field number -> values so far
        self._depth = 0
        self._list_limit = limits.get("max_list_length")
        self._layer_limit = limits.get("max_layers")

    def _ParseOrMerge(self, lines, message):  # ``lines`` is the whole text here
        tokenizer = Tokenizer(lines)
        if message:
            self.root_type = message.DESCRIPTOR.full_name
        while not tokenizer.AtEnd():
            self._MergeField(tokenizer, message)

    def _where(self, tokenizer) -> str:
        line, col = tokenizer.position()
        return f"{self.filename}:{line}:{col}"

    def _MergeMessage(self, tokenizer, message, end_token):
        if self._depth >= MAX_DEPTH:
            raise ParseError(f"messages nested more than {MAX_DEPTH} deep", where=self._where(tokenizer))
        self._depth += 1
        self._counts.append({})
        try:
            super()._MergeMessage(tokenizer, message, end_token)
        finally:
            self._counts.pop()
            self._depth -= 1

    def _charge(self, tokenizer, message, field) -> None:
        """Count one more value of ``field`` in the message being merged."""
        if not is_repeated(field):
            return
        counts = self._counts[-1]
        n = counts.get(field.number, 0) + 1
        counts[field.number] = n
        is_layer = field.name in ("layer", "layers") and message.DESCRIPTOR.name == "NetParameter"
        limit = self._layer_limit if is_layer else self._list_limit
        if n > limit:
            name = "max_layers" if is_layer else "max_list_length"
            what = "the net has more than" if is_layer else \
                f"field '{field.name}' of {message.DESCRIPTOR.name} is repeated more than"
            raise LimitError(f"{what} {limit} {'layers' if is_layer else 'times'} "
                             f"({limits.how_to_raise(name)})", where=self._where(tokenizer))

    def _MergeMessageField(self, tokenizer, message, field):
        self._charge(tokenizer, message, field)
        super()._MergeMessageField(tokenizer, message, field)

    def _MergeScalarField(self, tokenizer, message, field):
        self._charge(tokenizer, message, field)
        super()._MergeScalarField(tokenizer, message, field)


def parse(text: str, message, filename: str = "<string>", *, strict: bool = True):
    """Parse ``text`` into ``message`` (``text_format.Parse``, or ``Merge`` without
    ``strict``) in memory proportional to the text; protobuf's ``ParseError`` for bad
    syntax, ``ParseError``/``LimitError`` (located) for nesting and list limits."""
    parser = _Parser(filename, allow_unknown_extension=False)
    if strict:
        parser.ParseLines(text, message)
    else:
        parser.MergeLines(text, message)
    return message

