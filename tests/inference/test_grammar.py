"""The engine's constrained decoding: every output of a suite of JSON schemas parses and validates, on random
weights, greedy and sampled, in batches that mix constrained and free rows, the base model and adapters."""

from __future__ import annotations

import json

import jsonschema
import pytest

from app.errors import InvalidRequest
from app.inference.grammar import GrammarTokenizer, json_schema_constraint
from tests.inference.conftest import TINY, request, run_one_by_one, run_together
from tests.inference.json_schemas import SCHEMAS

pytestmark = pytest.mark.slow
PROMPT = "Answer in JSON:"


def constrained(tokenizer, name: str, adapter=None, **options):
    options.setdefault("max_tokens", 400)
    return request(
        tokenizer, PROMPT, adapter, constraint=json_schema_constraint(SCHEMAS[name], "response_format"), **options
    )


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_every_schema_output_parses_and_validates(engine, tokenizer, adapters, sampled):
    """All schemas at once, alternating base model and adapters, with free requests between them."""
    options = dict(temperature=1.0, seed=7) if sampled else {}
    names = list(SCHEMAS)
    owners = [None, *adapters]
    requests = [constrained(tokenizer, name, owners[i % len(owners)], **options) for i, name in enumerate(names)]
    free = [request(tokenizer, "Once upon a time", adapters[0], max_tokens=20), request(tokenizer, "{", None)]
    results = run_together(engine, requests + free)
    for name, (text, finished) in zip(names, results, strict=False):
        assert finished.finish_reason == "stop", (name, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])
    assert all(finished.finish_reason == "length" for _, finished in results[len(names) :])


def test_free_rows_are_unchanged_by_constrained_neighbours(engine, tokenizer, adapters):
    """A free request answers the same beside constrained ones as alone; a constrained one too."""
    free = [request(tokenizer, "The capital of France is", adapters[1], max_tokens=24), request(tokenizer, "{", None)]
    mixed = [constrained(tokenizer, "person"), free[0], constrained(tokenizer, "refs", adapters[1]), free[1]]
    together = run_together(engine, mixed)
    alone = run_one_by_one(engine, mixed)
    assert [text for text, _ in together] == [text for text, _ in alone]
    assert not together[1][0].startswith("{")  # the free row was not held to JSON


def test_a_constraint_changes_a_free_answer_into_json(engine, tokenizer):
    """The tiny model's free answer to the prompt is not JSON; the constraint is what makes it so."""
    (free, _), (json_text, _) = run_together(
        engine, [request(tokenizer, PROMPT, max_tokens=40), constrained(tokenizer, "label_enum")]
    )
    with pytest.raises(ValueError):
        json.loads(free)
    assert json.loads(json_text)["label"] in {"positive", "negative", "neutral"}


def test_max_tokens_cuts_a_constrained_answer_with_length(engine, tokenizer):
    ((text, finished),) = run_together(engine, [constrained(tokenizer, "nested_address", max_tokens=5)])
    assert finished.finish_reason == "length" and finished.completion_tokens == 5
    assert text.startswith('{"')


@pytest.mark.parametrize("keyword", ["uniqueItems", "not"])
def test_a_schema_keyword_the_engine_cannot_enforce_is_refused_by_name(engine, tokenizer, keyword):
    """Refused when submitted, before anything is queued (the API has loaded the base model by then)."""
    engine.tokenizer(TINY)
    schema = {"type": "array", "items": {"type": "string"}, keyword: True if keyword == "uniqueItems" else {}}
    with pytest.raises(InvalidRequest) as refused:
        engine.submit(request(tokenizer, PROMPT, constraint=json_schema_constraint(schema, "response_format")))
    assert keyword in refused.value.message and refused.value.param == "response_format"


def test_matchers_of_one_grammar_are_independent(tokenizer):
    """The grammar is compiled once and copied per sequence: advancing one copy leaves the next at the start."""
    grammar = GrammarTokenizer(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    constraint = json_schema_constraint({"type": "object", "properties": {"a": {"type": "integer"}}}, "x")
    first = grammar.matcher(constraint)
    assert first.consume_tokens(tokenizer.encode('{"a":', add_special_tokens=False))
    second = grammar.matcher(constraint)
    assert not second.validate_tokens(tokenizer.encode("1", add_special_tokens=False))  # must open an object
    assert first.consume_tokens(tokenizer.encode("1}", add_special_tokens=False)) and first.is_accepting()
    assert second.consume_tokens(tokenizer.encode('{"a":2}', add_special_tokens=False)) and second.is_accepting()
