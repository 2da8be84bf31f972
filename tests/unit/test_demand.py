"""The request's demand: model, stream and token cost, read once from its JSON body."""

from __future__ import annotations

import json

import pytest

from proxy.core.demand import CHARS_PER_TOKEN, RATIO_MAX, UNKNOWN, TokenRatio, parse_demand


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_chat_request() -> None:
    demand = parse_demand(body(
        model="llama-3-70b", stream=True, max_tokens=64,
        messages=[{"role": "system", "content": "x" * 40},
                  {"role": "user", "content": [{"type": "text", "text": "y" * 20},
                                               {"type": "image_url", "image_url": {"url": "u"}}]}],
    ))
    assert demand.model == "llama-3-70b"
    assert demand.stream is True
    assert demand.prompt_chars == 60
    assert demand.max_tokens == 64
    assert demand.cost(default_max_tokens=256) == 60 // 4 + 64


def test_completion_with_token_ids_counts_them_exactly() -> None:
    demand = parse_demand(body(model="m", prompt=[[1, 2, 3], [4, 5]], max_completion_tokens=10))
    assert (demand.prompt_chars, demand.prompt_ids, demand.max_tokens) == (0, 5, 10)
    assert demand.cost(default_max_tokens=999) == 15


def test_default_max_tokens_and_ratio() -> None:
    demand = parse_demand(body(model="m", prompt="z" * 99))
    assert demand.max_tokens is None
    assert demand.stream is False
    assert demand.cost(default_max_tokens=100) == 25 + 100  # ceil(99 / 4)
    assert demand.cost(default_max_tokens=100, chars_per_token=3.0) == 33 + 100


def test_embeddings_input() -> None:
    assert parse_demand(body(model="e5", input=["ab", "cde"])).prompt_chars == 5


@pytest.mark.parametrize("raw", [
    b"", b"not json", b"[1, 2]", b'"model"', b"{" * 100_000, b'{"model": 7}',
])
def test_what_is_not_a_json_object_with_a_model_names_none(raw: bytes) -> None:
    demand = parse_demand(raw)
    assert demand.model is None
    assert demand.stream is False


def test_unparsable_body_is_unknown() -> None:
    assert parse_demand(b"{" * 100_000) is UNKNOWN


@pytest.mark.parametrize("value", [True, -1, 1.5, "64"])
def test_max_tokens_that_are_not_counts_are_ignored(value: object) -> None:
    assert parse_demand(body(model="m", max_tokens=value)).max_tokens is None


def test_stream_must_be_true_itself() -> None:
    assert parse_demand(body(stream="true")).stream is False
    assert parse_demand(body(stream=1)).stream is False


def test_token_ratio_calibrates_and_is_bounded() -> None:
    ratio = TokenRatio()
    assert ratio.value == CHARS_PER_TOKEN
    ratio.record(prompt_chars=50, prompt_tokens=50)  # too short to teach anything
    assert ratio.value == CHARS_PER_TOKEN
    for _ in range(200):
        ratio.record(prompt_chars=3000, prompt_tokens=1000)
    assert ratio.value == pytest.approx(3.0)
    for _ in range(2000):
        ratio.record(prompt_chars=100_000, prompt_tokens=1)
    assert ratio.value == RATIO_MAX
