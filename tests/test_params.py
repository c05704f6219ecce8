"""Validation: every bad value is rejected with an error that names its field."""

import math

import pytest

from llama_pkg.params import InputError, Request, parse_stop_sequences, validate

BAD = [
    ("prompt", None), ("prompt", ""), ("prompt", "  \n"), ("prompt", 5), ("prompt", "a\x00b"),
    ("system_prompt", 3), ("max_new_tokens", 0), ("max_new_tokens", 4097), ("max_new_tokens", 2.5),
    ("max_new_tokens", "10"), ("max_new_tokens", True), ("min_new_tokens", -2), ("min_new_tokens", 600),
    ("temperature", -0.1), ("temperature", 5.1), ("temperature", math.nan), ("temperature", math.inf),
    ("top_p", -0.01), ("top_p", 1.01), ("top_k", -2), ("top_k", 32001), ("max_tokens", 0), ("min_tokens", -2), ("repetition_penalty", 0),
    ("repetition_penalty", 6), ("presence_penalty", 2.5), ("frequency_penalty", -3), ("seed", -1),
    ("seed", 2**32), ("seed", "7"), ("stop_sequences", '["a", 1]'), ("stop_sequences", "[not json"),
    ("stop_sequences", ["a"]), ("stop_sequences", ",".join("x" * 17)), ("stop_sequences", "y" * 257),
    ("prompt_template", "no placeholder"), ("prompt_template", 1), ("nonsense", 1),
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}"[:40] for f, v in BAD])
def test_bad_value_names_the_field(field, value):
    inputs = {"prompt": "hi", field: value}
    with pytest.raises(InputError) as e:
        validate(inputs)
    assert e.value.field == field
    assert str(e.value).startswith(f"{field}: ")


def test_defaults():
    r = validate({"prompt": "hi"})
    assert r == Request(prompt="hi")
    assert (r.max_new, r.min_new, r.temperature, r.top_p, r.top_k, r.repetition_penalty, r.seed) == (512, 0, 0.7, 0.95, 0,
                                                                                                      1.15, None)
    assert r.system_prompt.startswith("You are a helpful, respectful and honest assistant. Always answer as helpfully")


def test_integral_floats_and_bounds_are_accepted():
    r = validate({"prompt": "hi", "max_new_tokens": 4096.0, "top_p": 1, "temperature": 0, "seed": 2**32 - 1,
                  "min_new_tokens": 4096})
    assert r.max_new == 4096 and isinstance(r.max_new, int) and r.top_p == 1.0


@pytest.mark.parametrize("given,max_new,min_new", [
    ({"max_tokens": 100}, 100, 0), ({"max_new_tokens": 100}, 100, 0), ({"max_tokens": 100, "max_new_tokens": 100}, 100, 0),
    ({"max_tokens": 512, "max_new_tokens": 100}, 100, 0),  # at its default a name counts as not given
    ({"min_tokens": 7, "max_tokens": 9}, 9, 7), ({"min_new_tokens": 7}, 512, 7), ({"min_tokens": -1, "min_new_tokens": 3}, 512, 3),
])
def test_replicates_names_and_their_older_ones_are_one_input(given, max_new, min_new):
    r = validate({"prompt": "hi", **given})
    assert (r.max_new, r.min_new) == (max_new, min_new)


def test_two_names_of_one_input_that_disagree_are_refused_naming_both():
    with pytest.raises(InputError, match="^max_tokens: is 100 and max_new_tokens, its older name, is 200: give one "
                                         "of the two$"):
        validate({"prompt": "hi", "max_tokens": 100, "max_new_tokens": 200})
    with pytest.raises(InputError, match="^min_tokens: is 5 and min_new_tokens, its older name, is 6"):
        validate({"prompt": "hi", "min_tokens": 5, "min_new_tokens": 6})
    with pytest.raises(InputError, match="^min_new_tokens: must not be above max_tokens \\(10\\), got 11"):
        validate({"prompt": "hi", "max_tokens": 10, "min_new_tokens": 11})


def test_top_k_minus_one_is_off_as_zero():
    assert validate({"prompt": "hi", "top_k": -1}).top_k == 0


def test_stop_sequences_comma_and_json():
    assert parse_stop_sequences("User:,\n\n,,") == ["User:", "\n\n"]
    assert parse_stop_sequences('["a,b", "</s>"]') == ["a,b", "</s>"]
    assert parse_stop_sequences("") == []


def test_only_a_first_character_bracket_makes_stop_sequences_json():
    """Stops are used verbatim: a leading space keeps a bracketed value plain text."""
    assert parse_stop_sequences(" [x") == [" [x"]
    assert parse_stop_sequences(' ["a", "b"]') == [' ["a"', ' "b"]']
    with pytest.raises(InputError, match="stop_sequences"):
        parse_stop_sequences("[x")


MESSAGES_BAD = [
    ("[]", "non-empty"), ("{}", "non-empty"), ("[1]", "exactly role and content"), ("not json", "not valid JSON"),
    ('[{"role": "user"}]', "exactly role and content"),
    ('[{"role": "user", "content": "a", "name": "x"}]', "exactly role and content"),
    ('[{"role": "tool", "content": "a"}]', "[0].role must be one of system, user, assistant"),
    ('[{"role": "user", "content": 5}]', "[0].content must be a string"),
    ('[{"role": "user", "content": "  "}]', "[0].content must not be empty"),
    ('[{"role": "assistant", "content": "a"}]', "[0] is an assistant message where a user one belongs"),
    ('[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]', "[1] is a user message where an assistant"),
    ('[{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "system", "content": "b"}]',
     "[2] is a system message where an assistant one belongs: only the first"),
    ('[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]', "must end with a user message"),
    ('[{"role": "system", "content": "s"}]', "must end with a user message"),
]


@pytest.mark.parametrize("value,words", MESSAGES_BAD, ids=[v[:40] for v, _ in MESSAGES_BAD])
def test_bad_messages_name_the_field_and_the_message(value, words):
    with pytest.raises(InputError) as e:
        validate({"messages": value})
    assert e.value.field == "messages" and words in str(e.value), str(e.value)


def test_messages_and_prompt_are_one_or_the_other():
    dialog = '[{"role": "user", "content": "a"}]'
    for inputs, field in [({"messages": dialog, "prompt": "b"}, "messages"), ({}, "prompt"),
                          ({"messages": dialog, "prompt_template": "x {prompt}"}, "prompt_template")]:
        with pytest.raises(InputError) as e:
            validate(inputs)
        assert e.value.field == field and (field != "messages" or "prompt" in str(e.value))
    assert validate({"messages": dialog}).dialog == (("user", "a"),)
