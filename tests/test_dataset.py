"""The dataset checker: every malformed record is reported with its line number and what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from kimi_operator.workloads import dataset


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
        "found 'conversations': set spec.dataset.messagesKey",
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
