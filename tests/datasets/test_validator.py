"""The validator on a corpus of bad files: the exact problem kinds and line numbers, and good files pass."""

from __future__ import annotations

import json

import pytest

from app.datasets import StreamingValidator
from app.datasets.report import LINES_SHOWN_PER_KIND
from tests.datasets.samples import chat_example, jsonl, preference_example, prompt_completion_example

OK = json.dumps(chat_example())


def msg(role, content="x", **extra):
    return {"role": role, "content": content, **extra}


def chat(*messages, **extra):
    return json.dumps({"messages": list(messages), **extra})


USER, ASSISTANT = msg("user"), msg("assistant")

# name -> (lines, expected {kind: [line numbers]}). Ten good lines keep `too_few_examples` out of the way
# unless a case is about it.
BAD_FILES = {
    "not_utf8": ([OK] * 10 + [b'{"prompt": "\xff\xfe"}'], {"invalid_utf8": [11]}),
    "invalid_json": ([OK] * 10 + ['{"messages": [', OK], {"invalid_json": [11]}),
    "array_line": ([OK] * 10 + ["[1, 2]"], {"data_type": [11]}),
    "string_line": (['"hello"'] + [OK] * 10, {"data_type": [1]}),
    "no_known_keys": ([OK] * 10 + ['{"text": "hi"}'], {"missing_messages_list": [11]}),
    "messages_not_list": ([OK] * 10 + ['{"messages": "hi"}'], {"missing_messages_list": [11]}),
    "messages_empty": ([OK] * 10 + ['{"messages": []}'], {"missing_messages_list": [11]}),
    "message_no_role": ([OK] * 10 + [chat({"content": "x"}, ASSISTANT)], {"message_missing_key": [11]}),
    "message_unknown_key": (
        [OK] * 10 + [chat(msg("user", foo=1), ASSISTANT)],
        {"message_unrecognized_key": [11]},
    ),
    "unknown_role": ([OK] * 10 + [chat(msg("robot"), ASSISTANT)], {"unrecognized_role": [11]}),
    "content_not_string": ([OK] * 10 + [chat(msg("user", 5), ASSISTANT)], {"missing_content": [11]}),
    "content_null_user": ([OK] * 10 + [chat(msg("user", None), ASSISTANT)], {"missing_content": [11]}),
    "no_assistant": ([OK] * 10 + [chat(USER)], {"example_missing_assistant_message": [11]}),
    "all_weight_zero": (
        [OK] * 10 + [chat(USER, msg("assistant", weight=0))],
        {"example_missing_trained_assistant_message": [11]},
    ),
    "weight_two": ([OK] * 10 + [chat(USER, msg("assistant", weight=2))], {"invalid_weight": [11]}),
    "weight_on_user": (
        [OK] * 10 + [chat(msg("user", weight=1), ASSISTANT)],
        {"weight_not_on_assistant": [11]},
    ),
    "example_unknown_key": ([OK] * 10 + [chat(USER, ASSISTANT, extra=1)], {"example_unrecognized_key": [11]}),
    "tools_not_list": ([OK] * 10 + [chat(USER, ASSISTANT, tools="x")], {"invalid_tools": [11]}),
    "empty_line_middle": ([OK] * 5 + ["", "  "] + [OK] * 5, {"empty_line": [6, 7]}),
    "mixed_formats": (
        [OK] * 10 + [json.dumps(prompt_completion_example())],
        {"mixed_formats": [11]},
    ),
    "prompt_only": (
        [json.dumps({"prompt": "a"})] * 10,
        {"example_missing_key": list(range(1, 6)), "too_few_examples": []},
    ),
    "completion_not_string": (
        [json.dumps(prompt_completion_example())] * 10 + [json.dumps({"prompt": "a", "completion": 1})],
        {"invalid_prompt_completion": [11]},
    ),
    "preference_two_outputs": (
        [json.dumps(preference_example())] * 10
        + [json.dumps({**preference_example(), "preferred_output": [ASSISTANT, ASSISTANT]})],
        {"invalid_preference_output": [11]},
    ),
    "too_few": ([OK] * 3, {"too_few_examples": []}),
    "only_blank": (["", ""], {"empty_file": []}),
    "several_kinds": (
        [OK] * 10 + ["{", "[]", "{", chat(USER)],
        {"invalid_json": [11, 13], "data_type": [12], "example_missing_assistant_message": [14]},
    ),
}


def run(lines, chunk_size: int | None = None):
    body = b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n"
    validator = StreamingValidator()
    if chunk_size is None:
        validator.feed(body)
    else:
        for i in range(0, len(body), chunk_size):
            validator.feed(body[i : i + chunk_size])
    return validator.finish()


def test_corpus_is_big_enough():
    assert len(BAD_FILES) >= 20


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_reports_exact_kinds_and_lines(name):
    lines, expected = BAD_FILES[name]
    report = run(lines)
    assert not report.ok
    assert {kind: p.lines for kind, p in report.problems.items()} == expected
    summary = report.summary()
    for kind, line_numbers in expected.items():
        assert kind in summary
        for n in line_numbers:
            assert str(n) in summary


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_chunk_boundaries_do_not_change_the_report(chunk_size):
    lines, _ = BAD_FILES["several_kinds"]
    whole = run(lines)
    assert run(lines, chunk_size).to_dict() == whole.to_dict()


def test_line_numbers_are_capped_per_kind_but_all_counted():
    report = run([OK] * 10 + ["{"] * 12)
    problem = report.problems["invalid_json"]
    assert problem.count == 12
    assert problem.lines == list(range(11, 11 + LINES_SHOWN_PER_KIND))
    assert "invalid_json: 12 (lines 11, 12, 13, 14, 15, ...)" in report.summary()


def test_too_few_examples_uses_openai_code_and_message():
    report = run([OK] * 3)
    assert report.code == "invalid_n_examples"
    assert "file has 3 example(s), but must have at least 10 examples" in report.summary()


@pytest.mark.parametrize(
    "examples,fmt",
    [
        ([chat_example(i) for i in range(10)], "chat"),
        ([prompt_completion_example(i) for i in range(10)], "prompt_completion"),
        ([preference_example(i) for i in range(10)], "preference"),
    ],
)
def test_valid_files_of_each_format(examples, fmt):
    validator = StreamingValidator()
    validator.feed(jsonl(examples))
    report = validator.finish()
    assert report.ok, report.summary()
    assert (report.format, report.n_examples) == (fmt, 10)
    assert report.stats["content_chars"] > 0


def test_valid_chat_variants():
    rich = [
        {"messages": [msg("system"), USER, msg("assistant", weight=0), USER, msg("assistant", weight=1)]},
        {
            "messages": [
                USER,
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
                {"role": "tool", "content": "42", "tool_call_id": "c1"},
                ASSISTANT,
            ],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
    ]
    report = run([json.dumps(e) for e in rich * 5] + ["", ""])  # trailing blank lines are fine
    assert report.ok, report.summary()
    assert report.n_examples == 10


def test_crlf_line_endings():
    body = (OK + "\r\n") * 10
    validator = StreamingValidator()
    validator.feed(body.encode())
    assert validator.finish().ok


def test_utf8_bom_at_start_is_accepted():
    validator = StreamingValidator()
    validator.feed(b"\xef\xbb\xbf" + (OK + "\n").encode() * 10)
    assert validator.finish().ok


def test_json_that_python_would_accept_but_is_not_json_is_rejected():
    # NaN and lone surrogates are not JSON; a tokenizer would choke on the latter later.
    lines = [OK] * 10 + ['{"prompt": "a", "completion": NaN}', '{"prompt": "\\ud800", "completion": "b"}']
    assert {k: p.lines for k, p in run(lines).problems.items()} == {"invalid_json": [11, 12]}


def test_overlong_line_is_reported_not_buffered():
    validator = StreamingValidator(max_line_bytes=1000)
    body = (OK + "\n") * 10 + '{"prompt": "' + "a" * 5000 + '"}\n' + OK + "\n"
    for i in range(0, len(body), 100):
        validator.feed(body[i : i + 100].encode())
        assert len(validator._partial) <= 1100
    report = validator.finish()
    assert {k: p.lines for k, p in report.problems.items()} == {"line_too_long": [11]}
    assert report.n_examples == 11
