"""The dataset checker: every malformed record is reported with its line number and what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from kimi_operator.workloads.train import dataset


def rec(*turns: tuple[str, object], key: str = "messages") -> str:
    return json.dumps({key: [{"role": r, "content": c} for r, c in turns]})


GOOD = rec(("user", "Hello"), ("assistant", "Hi, how can I help?"))
GOOD_SYSTEM = rec(("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"), ("user", "3+3?"), ("assistant", "6"))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    Image.new("RGB", (8, 8), "red").save(tmp_path / "cat.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def image(url: str, text: str = "What is this?") -> list[dict[str, object]]:
    return [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]


# (case id, the bad line, message the error must hold). The bad line is always line 2, after a good one.
BAD: list[tuple[str, str, str]] = [
    ("not-json", '{"messages": [', "invalid JSON"),
    ("truncated-json", GOOD[:-2], "invalid JSON"),
    ("blank-line", "   ", "blank line"),
    ("not-an-object", "[1, 2]", "record must be a JSON object, not list"),
    ("no-messages-key", json.dumps({"text": "hi"}), "no 'messages' key"),
    (
        "other-key",
        rec(("user", "a"), ("assistant", "b"), key="conversations"),
        "uses 'conversations' but earlier records (from line 1) use 'messages'",
    ),
    ("messages-not-list", json.dumps({"messages": "hello"}), "messages must be a non-empty list"),
    ("messages-empty", json.dumps({"messages": []}), "messages must be a non-empty list"),
    ("message-not-object", json.dumps({"messages": ["hello"]}), "messages[0]: message must be an object"),
    ("unknown-role", rec(("human", "a"), ("assistant", "b")), "messages[0]: unknown role 'human'"),
    ("missing-role", json.dumps({"messages": [{"content": "a"}]}), "messages[0]: unknown role None"),
    (
        "system-not-first",
        rec(("user", "a"), ("system", "b"), ("assistant", "c")),
        "messages[1]: system message only allowed first",
    ),
    (
        "assistant-first",
        rec(("assistant", "a"), ("user", "b"), ("assistant", "c")),
        "messages[0]: expected a user turn, found assistant",
    ),
    (
        "two-users",
        rec(("user", "a"), ("user", "b"), ("assistant", "c")),
        "messages[1]: expected a assistant turn, found user",
    ),
    (
        "two-assistants",
        rec(("user", "a"), ("assistant", "b"), ("assistant", "c")),
        "messages[2]: expected a user turn, found assistant",
    ),
    (
        "ends-with-user",
        rec(("user", "a"), ("assistant", "b"), ("user", "c")),
        "must end with an assistant turn, ends with user",
    ),
    ("only-system", rec(("system", "a")), "must end with an assistant turn, ends with system"),
    ("empty-content", rec(("user", ""), ("assistant", "b")), "messages[0]: empty content"),
    ("whitespace-content", rec(("user", "a"), ("assistant", "  \n")), "messages[1]: empty content"),
    (
        "missing-content",
        json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}),
        "messages[0]: no content",
    ),
    ("content-number", rec(("user", 42), ("assistant", "b")), "content must be a string or a list of parts, not int"),
    ("content-empty-list", rec(("user", []), ("assistant", "b")), "messages[0]: empty content"),
    (
        "empty-text-part",
        rec(("user", [{"type": "text", "text": ""}]), ("assistant", "b")),
        "messages[0].content[0]: empty text",
    ),
    (
        "unknown-part",
        rec(("user", [{"type": "audio", "data": "x"}]), ("assistant", "b")),
        "part type 'audio' is not 'text' or 'image_url'",
    ),
    (
        "image-without-url",
        rec(("user", [{"type": "image_url", "image_url": {}}]), ("assistant", "b")),
        "image_url part without image_url.url",
    ),
    ("missing-image", rec(("user", image("file://dog.png")), ("assistant", "b")), "image dog.png not found"),
    ("remote-image", rec(("user", image("https://example.com/cat.png")), ("assistant", "b")), "is not a file:// path"),
    ("broken-image", rec(("user", image("file://broken.png")), ("assistant", "b")), "image broken.png does not decode"),
    ("not-an-image", rec(("user", image("file://notes.txt")), ("assistant", "b")), "image notes.txt does not decode"),
]


def test_at_least_twenty_malformed_cases() -> None:
    assert len(BAD) >= 20


@pytest.mark.parametrize(("line", "message"), [(b[1], b[2]) for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_record_is_reported_with_its_line(root: Path, line: str, message: str) -> None:
    report = dataset.validate_lines([GOOD, line, GOOD_SYSTEM], root=root)
    assert not report.ok
    assert [e.line for e in report.errors] == [2], report.errors
    assert message in report.errors[0].message


def test_clean_set_passes_with_counts(root: Path) -> None:
    lines = [GOOD, GOOD_SYSTEM, rec(("user", image("file://cat.png")), ("assistant", "A red square."))]
    lines += [rec(("user", f"q{i}"), ("assistant", f"a{i}")) for i in range(100)]
    report = dataset.validate_lines(lines, root=root)
    assert report.ok, report.errors
    assert report.records == 103
    assert report.images == 1
    assert report.messages == 2 + 5 + 2 + 200
    assert report.warnings == []


def test_conversations_key(root: Path) -> None:
    report = dataset.validate_lines(
        [rec(("user", "a"), ("assistant", "b"), key="conversations")], key="conversations", root=root
    )
    assert report.ok
    assert (report.key, report.key_line) == ("conversations", None)


CONV = rec(("user", "Hello"), ("assistant", "Hi!"), key="conversations")
BOTH = json.dumps({"messages": json.loads(GOOD)["messages"], "conversations": json.loads(CONV)["conversations"]})
NEITHER = json.dumps({"text": "hi"})

# (case id, lines, key given, key used, line it was detected from, errors as "line: message" fragments).
KEYS: list[tuple[str, list[str], str | None, str | None, int | None, list[tuple[int, str]]]] = [
    ("guide-shape-detected", [CONV, CONV], None, "conversations", 1, []),
    ("messages-detected", [GOOD, GOOD_SYSTEM], None, "messages", 1, []),
    (
        "mixed-keys-every-differing-line",
        [GOOD, GOOD, CONV, rec(("user", "a")), CONV],
        None,
        "messages",
        1,
        [
            (3, "uses 'conversations' but earlier records (from line 1) use 'messages'"),
            # Checking goes on after the first differing line.
            (4, "messages: must end with an assistant turn"),
            (5, "uses 'conversations' but earlier records (from line 1) use 'messages'"),
        ],
    ),
    (
        "mixed-keys-conversations-first",
        [CONV, GOOD],
        None,
        "conversations",
        1,
        [(2, "uses 'messages' but earlier records (from line 1) use 'conversations'")],
    ),
    (
        "undecided-lines-before-the-deciding-one",
        ["{", NEITHER, "[1]", BOTH, CONV],
        None,
        "conversations",
        5,
        [
            (1, "invalid JSON"),
            (2, "no 'conversations' key"),
            (3, "record must be a JSON object"),
            (4, "has both 'messages' and 'conversations' keys"),
        ],
    ),
    (
        "detected-key-and-a-record-with-both",
        [CONV, BOTH],
        None,
        "conversations",
        1,
        [(2, "has both 'messages' and 'conversations' keys: set spec.dataset.messagesKey")],
    ),
    (
        "no-record-decides",
        [NEITHER, BOTH],
        None,
        None,
        None,
        [
            (1, "no 'messages' or 'conversations' key"),
            (2, "has both 'messages' and 'conversations' keys: set spec.dataset.messagesKey"),
        ],
    ),
    (
        "given-key-keeps-the-hint",
        [GOOD, CONV],
        "messages",
        "messages",
        None,
        [(2, "no 'messages' key (found 'conversations': set spec.dataset.messagesKey)")],
    ),
    (
        "given-key-other-than-the-records",
        [CONV],
        "messages",
        "messages",
        None,
        [(1, "no 'messages' key (found 'conversations': set spec.dataset.messagesKey)")],
    ),
    ("given-key-with-both", [BOTH], "conversations", "conversations", None, []),
]


@pytest.mark.parametrize(
    ("lines", "key", "used", "detected_at", "errors"), [k[1:] for k in KEYS], ids=[k[0] for k in KEYS]
)
def test_messages_key_is_given_or_detected(
    root: Path,
    lines: list[str],
    key: str | None,
    used: str | None,
    detected_at: int | None,
    errors: list[tuple[int, str]],
) -> None:
    report = dataset.validate_lines(lines, key=key, root=root)
    assert (report.key, report.key_line) == (used, detected_at)
    assert [e.line for e in report.errors] == [line for line, _ in errors], report.errors
    for error, (_, fragment) in zip(report.errors, errors, strict=True):
        assert fragment in error.message
    assert report.ok == (not errors)


def test_the_guides_conversations_file_passes_the_command(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = root / "train.jsonl"
    data.write_text(CONV + "\n" + rec(("user", "2+2?"), ("assistant", "4"), key="conversations") + "\n")
    assert dataset.main([str(data)]) == 0
    out = capsys.readouterr().out
    assert "records: 2, messages: 4, images: 0, duplicates: 0, errors: 0" in out
    assert "messages key: 'conversations' (detected from line 1)" in out
    assert dataset.main([str(data), "--messages-key=messages"]) == 1
    out = capsys.readouterr().out
    assert "messages key: 'messages' (given)" in out
    assert "error: line 1: no 'messages' key (found 'conversations': set spec.dataset.messagesKey)" in out


@pytest.mark.parametrize("content", [b"", b"\n", b"\r\n", b"\n\n  \n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n"])
def test_an_empty_dataset_is_an_error(root: Path, content: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    data = root / "train.jsonl"
    data.write_bytes(content)
    report = dataset.validate_file(data)
    assert not report.ok
    assert [str(e) for e in report.errors] == ["no records: the dataset is empty"]
    assert report.records == 0
    assert dataset.main([str(data)]) == 1
    assert "error: no records: the dataset is empty" in capsys.readouterr().out


def test_no_lines_is_an_empty_dataset(root: Path) -> None:
    assert [str(e) for e in dataset.validate_lines([], root=root).errors] == ["no records: the dataset is empty"]


def _with(bad: bytes) -> bytes:
    """A good record whose user content holds ``bad`` (after the accented "é")."""
    return rec(("user", "caf\u00e9 BAD"), ("assistant", "b")).encode().replace(b"\\u00e9 BAD", "é".encode() + bad)


# (case id, bytes of line 2, column of the bad byte in characters, the message's end).
UTF8: list[tuple[str, bytes, str]] = [
    ("invalid-start-byte", _with(b"\xff"), "byte 0xff at column 48 (invalid start byte)"),
    ("lone-continuation-byte", _with(b"\x80"), "byte 0x80 at column 48 (invalid start byte)"),
    ("cut-sequence-mid-line", _with(b"\xe2\x82"), "byte 0xe2 at column 48 (invalid continuation byte)"),
    ("cut-sequence-at-line-end", b'{"messages": "x\xe2', "byte 0xe2 at column 16 (unexpected end of data)"),
    (
        "latin-1-text",
        rec(("user", "caf"), ("assistant", "b")).encode().replace(b"caf", b"caf\xe9"),
        "byte 0xe9 at column 47 (invalid continuation byte)",
    ),
]


@pytest.mark.parametrize(("line", "message"), [u[1:] for u in UTF8], ids=[u[0] for u in UTF8])
def test_invalid_utf8_is_reported_with_its_line(
    root: Path, line: bytes, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = root / "train.jsonl"
    data.write_bytes(b"\n".join([GOOD.encode(), line, GOOD_SYSTEM.encode(), rec(("user", "a")).encode()]) + b"\n")
    report = dataset.validate_file(data)
    assert [e.line for e in report.errors] == [2, 4], report.errors
    assert report.errors[0].message.startswith("not valid UTF-8: ")
    assert report.errors[0].message.endswith(message)
    # The other lines are still checked, and the undecodable one is no record.
    assert "must end with an assistant turn" in report.errors[1].message
    assert report.records == 3
    assert dataset.main([str(data)]) == 1  # a finding, not a crash of the command
    assert "error: line 2: not valid UTF-8: " in capsys.readouterr().out


def test_the_column_of_a_bad_byte_counts_characters(root: Path) -> None:
    (bad,) = dataset.validate_lines([b'{"a": "\xc3\xa9\xe2\x82\xac\xff"}'], root=root).errors
    assert bad == dataset.Problem(1, "not valid UTF-8: byte 0xff at column 10 (invalid start byte)")


def test_a_leading_byte_order_mark_is_skipped_elsewhere_it_is_an_error(root: Path) -> None:
    data = root / "train.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + (GOOD + "\r\n" + GOOD_SYSTEM + "\r\n").encode())
    report = dataset.validate_file(data)
    assert report.errors == []
    assert (report.records, report.key, report.key_line) == (2, "messages", 1)
    # A second mark (files joined with cat) is inside a record: the trainer could not parse it either.
    data.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n\xef\xbb\xbf" + GOOD_SYSTEM.encode() + b"\n")
    (error,) = dataset.validate_file(data).errors
    assert error.line == 2
    assert "invalid JSON: Unexpected UTF-8 BOM" in error.message


def test_small_sets_and_duplicates_warn_but_pass(root: Path) -> None:
    report = dataset.validate_lines([GOOD, GOOD, GOOD_SYSTEM], root=root)
    assert report.ok
    assert report.duplicates == 1
    assert "only 3 examples" in report.warnings[0]
    assert "1 duplicate records" in report.warnings[1]


def test_summary_lists_the_first_errors_then_how_many_more(root: Path) -> None:
    report = dataset.validate_lines(["{"] * 25, root=root)
    text = report.summary(max_errors=20)
    assert "line 1: invalid JSON" in text
    assert "line 20: invalid JSON" in text
    assert "line 21:" not in text
    assert "... and 5 more errors" in text


def test_command_exits_non_zero_on_errors(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = root / "train.jsonl"
    good.write_text("\n".join([GOOD, rec(("user", image("file://cat.png")), ("assistant", "red"))]) + "\n")
    assert dataset.main([str(good)]) == 0
    assert "records: 2, messages: 4, images: 1, duplicates: 0, errors: 0" in capsys.readouterr().out
    bad = root / "bad.jsonl"
    bad.write_text(GOOD + "\n" + rec(("user", "a")) + "\n")
    assert dataset.main([str(bad)]) == 1
    assert "error: line 2: messages: must end with an assistant turn, ends with user" in capsys.readouterr().out


def test_relative_images_resolve_against_the_given_root(root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("data") / "train.jsonl"
    elsewhere.write_text(rec(("user", image("file://cat.png")), ("assistant", "red")) + "\n")
    assert not dataset.validate_file(elsewhere).ok
    assert dataset.validate_file(elsewhere, root=root).ok


def test_records_longer_than_the_cutoff_are_named(root: Path) -> None:
    long = rec(("user", "x" * 50), ("assistant", "y" * 50))
    lines = [GOOD, long, GOOD_SYSTEM, long]

    def count(messages: list[dict[str, object]]) -> int:
        return sum(len(str(m["content"])) for m in messages)

    report = dataset.validate_lines(lines, root=root, count_tokens=count, cutoff_len=40)
    assert report.ok
    assert (
        "2 records are longer than cutoffLen 40 and will be truncated: line 2 (100 tokens), line 4 (100 tokens)"
        in report.warnings
    )


def test_a_record_with_unicode_line_separators_is_one_record(root: Path) -> None:
    # json.dumps(ensure_ascii=False) writes U+2028, U+0085 and \v unescaped; they end no line.
    text = "first\u2028second\x85third\x0bfourth"
    line = json.dumps(
        {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]}, ensure_ascii=False
    )
    (root / "data.jsonl").write_text(line + "\r\n" + line.replace("ok", "fine") + "\n", encoding="utf-8")
    report = dataset.validate_file(root / "data.jsonl")
    assert report.errors == []
    assert report.records == 2
