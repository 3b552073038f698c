"""``kimi-operator validate-dataset``: check a chat dataset before any GPU time is spent on it.

Records are JSON lines in the OpenAI messages shape, under ``messages`` or ``conversations``:
``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}``.
Unless ``--messages-key`` names it, the key is the one of the first record that has exactly one of
the two; every record must then use it. The file is UTF-8 (a leading byte order mark is allowed).
Content is a string, or a list of parts ``{"type": "text", "text": ...}`` and
``{"type": "image_url", "image_url": {"url": "file://relative/or/absolute.png"}}``; relative image
paths are resolved against the dataset's directory (or ``--root``).

Every problem is reported with its line number (an empty file, with none); the first ones are
printed, then how many more.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
KEYS = ("messages", "conversations")
MIN_EXAMPLES = 100
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")


@dataclasses.dataclass(frozen=True)
class Problem:
    line: int | None  # None: the file as a whole
    message: str

    def __str__(self) -> str:
        return self.message if self.line is None else f"line {self.line}: {self.message}"


@dataclasses.dataclass
class Report:
    # The records' messages key: the one given, or the one detected (from line key_line).
    key: str | None = None
    key_line: int | None = None
    records: int = 0
    messages: int = 0
    images: int = 0
    duplicates: int = 0
    errors: list[Problem] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self, max_errors: int = 20) -> str:
        lines = [
            f"records: {self.records}, messages: {self.messages}, images: {self.images}, "
            f"duplicates: {self.duplicates}, errors: {len(self.errors)}"
        ]
        if self.key is None:
            lines.append(f"messages key: none found (no record has exactly one of {' or '.join(map(repr, KEYS))})")
        elif self.key_line is None:
            lines.append(f"messages key: {self.key!r} (given)")
        else:
            lines.append(f"messages key: {self.key!r} (detected from line {self.key_line})")
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"error: {e}" for e in self.errors[:max_errors]]
        if len(self.errors) > max_errors:
            lines.append(f"... and {len(self.errors) - max_errors} more errors")
        return "\n".join(lines)


def _image_problem(url: str, root: Path) -> str | None:
    if not url.startswith("file://"):
        return f"image url {url!r} is not a file:// path (remote images are not fetched during training)"
    raw = url[len("file://") :]
    path = Path(raw) if raw.startswith("/") else root / raw
    if not path.is_file():
        return f"image {raw} not found (looked at {path})"
    try:
        from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 (optional: the trainer image has it)
    except ImportError:
        with path.open("rb") as fh:
            head = fh.read(16)
        if not (head.startswith(IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")):
            return f"image {raw} is not a PNG, JPEG, GIF or WebP file"
        return None
    try:
        with Image.open(path) as img:
            img.load()  # decode the pixels, not only the header
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        return f"image {raw} does not decode: {exc}"
    return None


def _content_problems(content: Any, where: str, root: Path, report: Report) -> Iterator[str]:
    if isinstance(content, str):
        if not content.strip():
            yield f"{where}: empty content"
        return
    if not isinstance(content, list):
        yield f"{where}: content must be a string or a list of parts, not {type(content).__name__}"
        return
    if not content:
        yield f"{where}: empty content"
        return
    for i, part in enumerate(content):
        at = f"{where}.content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str) or not part["text"].strip():
                yield f"{at}: empty text"
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
            if not isinstance(url, str):
                yield f"{at}: image_url part without image_url.url"
                continue
            report.images += 1
            problem = _image_problem(url, root)
            if problem:
                yield f"{at}: {problem}"
        else:
            yield f"{at}: part type {kind!r} is not 'text' or 'image_url'"


def _role_problem(index: int, role: Any, expected: str) -> str | None:
    """Whether a turn's role fits: system first only, then user and assistant alternating."""
    if role not in ROLES:
        return f"unknown role {role!r} (expected one of {', '.join(ROLES)})"
    if role == "system":
        return None if index == 0 else "system message only allowed first"
    if role != expected:
        return f"expected a {expected} turn, found {role} (turns must alternate user/assistant)"
    return None


def record_key(record: Any) -> str | None:
    """The messages key a record uses: the one of KEYS it has, None if it has neither or both."""
    if not isinstance(record, dict):
        return None
    found = [k for k in KEYS if k in record]
    return found[0] if len(found) == 1 else None


def _key_problem(record: dict[str, Any], key: str | None, key_line: int | None) -> str | None:
    """Why a record has no messages under ``key`` (see :func:`check_record`); None when it has."""
    if key is None:
        if all(k in record for k in KEYS):
            return f"has both {KEYS[0]!r} and {KEYS[1]!r} keys: set spec.dataset.messagesKey to the one to train on"
        return f"no {KEYS[0]!r} or {KEYS[1]!r} key"
    other = "conversations" if key == "messages" else "messages"
    if key in record and other in record and key_line is not None:
        # Detected, not given: a record with both keys is as ambiguous as it is with no key given.
        return f"has both {KEYS[0]!r} and {KEYS[1]!r} keys: set spec.dataset.messagesKey to the one to train on"
    if key in record:
        return None
    if other in record and key_line is not None:
        return f"uses {other!r} but earlier records (from line {key_line}) use {key!r}"
    hint = f" (found {other!r}: set spec.dataset.messagesKey)" if other in record else ""
    return f"no {key!r} key{hint}"


def check_record(
    record: Any, key: str | None, root: Path, report: Report, *, key_line: int | None = None
) -> Iterator[str]:
    """Problems of one record whose messages are under ``key``.

    ``key_line`` is the line ``key`` was detected from (None: the key was given). ``key`` is None when
    detection found nothing: no record has exactly one of the keys, so every record has a problem.
    """
    if not isinstance(record, dict):
        yield f"record must be a JSON object, not {type(record).__name__}"
        return
    problem = _key_problem(record, key, key_line)
    if problem is not None:
        yield problem
        return
    assert key is not None  # _key_problem finds one whenever key is None
    messages = record[key]
    if not isinstance(messages, list) or not messages:
        yield f"{key} must be a non-empty list"
        return
    expected = "user"
    for i, message in enumerate(messages):
        where = f"{key}[{i}]"
        if not isinstance(message, dict):
            yield f"{where}: message must be an object"
            return
        # The first turn-order problem makes the rest of the record meaningless to check.
        problem = _role_problem(i, message.get("role"), expected)
        if problem:
            yield f"{where}: {problem}"
            return
        if message["role"] != "system":
            expected = "assistant" if message["role"] == "user" else "user"
        if "content" not in message:
            yield f"{where}: no content"
        else:
            yield from _content_problems(message["content"], where, root, report)
        report.messages += 1
    if messages[-1]["role"] != "assistant":
        yield f"{key}: must end with an assistant turn, ends with {messages[-1]['role']}"


# Counts the tokens of one record's messages (with the model's tokenizer).
TokenCounter = Callable[[list[dict[str, Any]]], int]


def _decode(number: int, line: str | bytes) -> str | Problem:
    if isinstance(line, str):
        return line
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Columns count characters, as JSON errors' do; everything before the bad byte decodes.
        column = len(line[: exc.start].decode("utf-8", errors="replace")) + 1
        return Problem(number, f"not valid UTF-8: byte 0x{line[exc.start]:02x} at column {column} ({exc.reason})")


def _parse(number: int, line: str | Problem) -> Any:
    """The record on a line, or the Problem that keeps it from being one."""
    if isinstance(line, Problem):
        return line
    if not line.strip():
        return Problem(number, "blank line")
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        return Problem(number, f"invalid JSON: {exc.msg} at column {exc.colno}")


def detect_key(lines: Iterable[str | Problem]) -> tuple[str, int] | None:
    """The messages key of the first record that has exactly one of KEYS, and its line."""
    for number, line in enumerate(lines, start=1):
        record = _parse(number, line)
        key = None if isinstance(record, Problem) else record_key(record)
        if key is not None:
            return key, number
    return None


def validate_lines(
    lines: Iterable[str | bytes],
    *,
    key: str | None = None,
    root: Path,
    count_tokens: TokenCounter | None = None,
    cutoff_len: int | None = None,
) -> Report:
    """Check every line. ``key`` None: detect it (see :func:`detect_key`), and every record must use it.

    Lines given as bytes are decoded as UTF-8 one by one, so that a bad byte is reported with its line.
    """
    report = Report(key=key)
    decoded = [_decode(number, line) for number, line in enumerate(lines, start=1)]
    if all(isinstance(line, str) and not line.strip() for line in decoded):
        # Nothing but blank lines (or nothing at all): one error says it, not one per blank line.
        report.errors.append(Problem(None, "no records: the dataset is empty"))
        return report
    if key is None:
        detected = detect_key(decoded)
        if detected is not None:
            report.key, report.key_line = detected
    seen: set[str] = set()
    too_long: list[tuple[int, int]] = []
    for number, line in enumerate(decoded, start=1):
        record = _parse(number, line)
        if isinstance(record, Problem):
            report.errors.append(record)
            continue
        report.records += 1
        found = list(check_record(record, report.key, root, report, key_line=report.key_line))
        report.errors.extend(Problem(number, message) for message in found)
        if not found and report.key is not None and count_tokens is not None and cutoff_len is not None:
            tokens = count_tokens(record[report.key])
            if tokens > cutoff_len:
                too_long.append((number, tokens))
        digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
        if digest in seen:
            report.duplicates += 1
        seen.add(digest)
    if report.records < MIN_EXAMPLES:
        report.warnings.append(f"only {report.records} examples; LoRA SFT usually needs at least {MIN_EXAMPLES}")
    if report.duplicates:
        report.warnings.append(f"{report.duplicates} duplicate records")
    if too_long:
        lines_ = ", ".join(f"line {n} ({t} tokens)" for n, t in too_long[:5])
        more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
        report.warnings.append(
            f"{len(too_long)} records are longer than cutoffLen {cutoff_len} and will be truncated: {lines_}{more}"
        )
    return report


def tokenizer_counter(path: Path, *, trust_remote_code: bool = False) -> TokenCounter:
    """Token counts with the model's own tokenizer (the trainer image has transformers). Kimi's is
    its own code beside the weights (tiktoken): ``trust_remote_code`` runs it, as the training that
    follows runs the model's."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)

    def count(messages: list[dict[str, Any]]) -> int:
        text = "".join(
            m["content"] if isinstance(m["content"], str) else " ".join(p.get("text", "") for p in m["content"])
            for m in messages
        )
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 4 * len(messages)  # role markers

    return count


def validate_file(
    path: Path,
    *,
    key: str | None = None,
    root: Path | None = None,
    count_tokens: TokenCounter | None = None,
    cutoff_len: int | None = None,
) -> Report:
    # A leading byte order mark (editors on Windows write one) is not part of the first record; the
    # trainer reads the file as utf-8-sig and skips it too.
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    # Lines as the trainer's `for line in file` sees them (universal newlines: \n, \r\n and \r end a
    # line): str.splitlines would also break a record at U+2028, U+0085 or \v, which
    # json.dumps(ensure_ascii=False) leaves unescaped inside strings. Split as bytes (\r and \n never
    # occur inside a UTF-8 sequence) and decoded line by line, so that a bad byte is reported with its line.
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    del data
    if lines and lines[-1] == b"":
        lines.pop()  # a trailing newline is not a blank record
    return validate_lines(lines, key=key, root=root or path.parent, count_tokens=count_tokens, cutoff_len=cutoff_len)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kimi-operator validate-dataset", description=__doc__)
    parser.add_argument("path", type=Path, help="JSON-lines file")
    parser.add_argument(
        "--messages-key",
        default=None,
        choices=KEYS,
        help="key of each record holding its messages (default: detected from the records)",
    )
    parser.add_argument("--root", type=Path, help="directory file:// image paths are relative to")
    parser.add_argument("--max-errors", type=int, default=20, help="errors printed before the count of the rest")
    parser.add_argument("--tokenizer", type=Path, help="model directory whose tokenizer counts tokens")
    parser.add_argument("--cutoff-len", type=int, help="warn about records longer than this many tokens")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the tokenizer's own code shipped with the model (Kimi's is), as the training does",
    )
    args = parser.parse_args(argv)
    try:
        counter = (
            tokenizer_counter(args.tokenizer, trust_remote_code=args.trust_remote_code)
            if args.tokenizer and args.cutoff_len
            else None
        )
        report = validate_file(
            args.path, key=args.messages_key, root=args.root, count_tokens=counter, cutoff_len=args.cutoff_len
        )
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: {args.path}: {exc}", file=sys.stderr)
        return 2
    print(report.summary(args.max_errors))
    return 0 if report.ok else 1
