"""A streaming JSONL validator: fed chunks as they arrive, it keeps at most one line in memory."""

from __future__ import annotations

from pathlib import Path

import orjson

from app.datasets.examples import check_example
from app.datasets.report import MIN_EXAMPLES, ValidationReport

# One example may be large (long documents), but a "line" of many megabytes is a binary or broken file,
# and buffering it whole would let one upload take unbounded memory.
MAX_LINE_BYTES = 8 * 1024 * 1024
UTF8_BOM = b"\xef\xbb\xbf"


class StreamingValidator:
    def __init__(self, *, min_examples: int = MIN_EXAMPLES, max_line_bytes: int = MAX_LINE_BYTES):
        self.report = ValidationReport()
        self._min_examples = min_examples
        self._max_line_bytes = max_line_bytes
        self._partial = b""
        self._skipping_long_line = False
        self._line_no = 0
        self._blank_lines: list[int] = []  # blank lines seen since the last non-blank one
        self._chars = 0
        self._max_chars = 0
        self._finished = False
        self._seen_content = False  # any non-blank line at all

    def feed(self, chunk: bytes) -> None:
        lines = chunk.split(b"\n")
        lines[0] = self._partial + lines[0]
        self._partial = lines.pop()
        for line in lines:
            self._line(line)
        if len(self._partial) > self._max_line_bytes:
            self._partial = b""
            if not self._skipping_long_line:
                self._line_no += 1
                self._seen_content = True
                self._flush_blank_lines()
                self.report.add("line_too_long", self._line_no)
                self._skipping_long_line = True

    def finish(self) -> ValidationReport:
        if self._finished:
            return self.report
        self._finished = True
        if self._partial:
            self._line(self._partial)
        # Blank lines at the very end (a trailing newline, or several) are harmless and not counted.
        report = self.report
        report.n_lines = self._line_no
        report.stats = {
            "content_chars": self._chars,
            "max_example_chars": self._max_chars,
            "mean_example_chars": round(self._chars / report.n_examples, 1) if report.n_examples else 0,
        }
        if not self._seen_content:
            report.add("empty_file", None)
        elif report.n_examples < self._min_examples:
            report.add("too_few_examples", None)
        return report

    def _flush_blank_lines(self) -> None:
        for line_no in self._blank_lines:
            self.report.add("empty_line", line_no)
        self._blank_lines.clear()

    def _line(self, raw: bytes) -> None:
        if self._skipping_long_line:
            # The rest of an over-long line: already reported under its own number.
            self._skipping_long_line = False
            return
        self._line_no += 1
        line_no = self._line_no
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if line_no == 1 and raw.startswith(UTF8_BOM):
            raw = raw[len(UTF8_BOM) :]  # editors on Windows write one; it is not part of the JSON
        if not raw.strip():
            self._blank_lines.append(line_no)
            return
        self._seen_content = True
        if self._blank_lines:
            self._flush_blank_lines()
        report = self.report
        try:
            # orjson parses bytes directly and rejects invalid UTF-8 itself: one pass, several times json's speed.
            example = orjson.loads(raw)
        except orjson.JSONDecodeError:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                report.add("invalid_utf8", line_no)
            else:
                report.add("invalid_json", line_no)
            return
        fmt, problems, chars = check_example(example)
        if fmt is not None:
            if report.format is None:
                report.format = fmt
            elif fmt != report.format:
                problems.append("mixed_formats")
        if problems:
            for kind in dict.fromkeys(problems):
                report.add(kind, line_no)
            return
        report.n_examples += 1
        self._chars += chars
        if chars > self._max_chars:
            self._max_chars = chars


def validate_path(path: Path, chunk_size: int = 1024 * 1024) -> ValidationReport:
    validator = StreamingValidator()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            validator.feed(chunk)
    return validator.finish()
