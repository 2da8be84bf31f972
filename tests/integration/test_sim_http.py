"""The fake vLLM over real loopback sockets: OpenAI shapes, SSE streaming, metrics, disconnects."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import SimulatedConfig
from proxy.sim.engine import SimEngine
from proxy.sim.server import SIM_ENGINE_KEY, create_sim_app

MODEL = "test-model"
FAST = SimulatedConfig(time_scale=0.01)
EVENTUALLY_S = 5.0


class Sim:
    def __init__(self, url: str, engine: SimEngine) -> None:
        self.url = url
        self.engine = engine


StartSim = Callable[..., Awaitable[Sim]]


@pytest.fixture
async def start_sim() -> AsyncIterator[StartSim]:
    """Start sim servers on 127.0.0.1:0; after the test, each must hold no request."""
    runners: list[tuple[web.AppRunner, SimEngine]] = []

    async def start(config: SimulatedConfig = FAST, *, handler_cancellation: bool = True) -> Sim:
        app = create_sim_app(config, model=MODEL)
        runner = web.AppRunner(app, handler_cancellation=handler_cancellation, shutdown_timeout=2)
        await runner.setup()
        engine = app[SIM_ENGINE_KEY]
        runners.append((runner, engine))
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return Sim(f"http://{host}:{port}", engine)

    yield start
    for runner, engine in runners:
        await eventually(lambda e=engine: e.running == 0 and e.waiting == 0)  # type: ignore[misc]
        await runner.cleanup()
        assert engine.total_started == engine.total_finished + engine.total_aborted, engine


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def eventually(condition: Callable[[], bool]) -> None:
    """Poll engine state until ``condition`` holds, failing after ``EVENTUALLY_S``."""
    async with asyncio.timeout(EVENTUALLY_S):
        # The engine's counters have no event to await; a bounded poll is the honest check.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.001)


async def sse_data(response: aiohttp.ClientResponse) -> AsyncGenerator[str, None]:
    """The ``data:`` payloads of an SSE response, one per event, as they arrive."""
    async for raw in response.content:
        line = raw.decode()
        if line.startswith("data: "):
            assert line.endswith("\n")
            yield line[len("data: ") : -1]


# --- non-streamed -----------------------------------------------------------------------------


async def test_completion_shape_and_usage(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    sim = await start_sim()
    body = {"model": "whatever", "prompt": "the quick brown fox", "max_tokens": 5}
    async with session.post(f"{sim.url}/v1/completions", json=body) as response:
        assert response.status == 200
        data = await response.json()
    assert data["id"].startswith("cmpl-")
    assert isinstance(data["created"], int)
    assert (data["object"], data["model"]) == ("text_completion", MODEL)
    assert data["choices"] == [
        {
            "index": 0,
            "text": " tok0 tok1 tok2 tok3 tok4",
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    assert data["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    assert sim.engine.total_finished == 1


async def test_chat_shape_usage_and_default_max_tokens(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    sim = await start_sim(SimulatedConfig(time_scale=0.01, default_max_tokens=3))
    body = {
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    }
    async with session.post(f"{sim.url}/v1/chat/completions", json=body) as response:
        assert response.status == 200
        data = await response.json()
    assert data["id"].startswith("chatcmpl-")
    assert (data["object"], data["model"]) == ("chat.completion", MODEL)
    assert data["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": " tok0 tok1 tok2"},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


async def test_chat_max_completion_tokens_wins(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    sim = await start_sim()
    body = {
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 9,
        "max_completion_tokens": 2,
    }
    async with session.post(f"{sim.url}/v1/chat/completions", json=body) as response:
        data = await response.json()
    assert data["usage"]["completion_tokens"] == 2


# --- streamed ---------------------------------------------------------------------------------


async def test_streamed_chat_arrives_token_by_token_then_usage_then_done(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    # Real time (18 ms a step, 0.36 s in all), so "before the last token" has a wide margin.
    sim = await start_sim(SimulatedConfig(time_scale=1.0))
    body = {
        "messages": [{"role": "user", "content": "tell me a story"}],
        "max_tokens": 20,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events: list[Any] = []
    produced_at_arrival: list[int] = []
    async with session.post(f"{sim.url}/v1/chat/completions", json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["Cache-Control"] == "no-cache"
        async for data in sse_data(response):
            produced_at_arrival.append(sim.engine.total_generated_tokens)
            events.append(data if data == "[DONE]" else json.loads(data))

    # The first event was read while the engine still had tokens of this request to produce.
    assert produced_at_arrival[0] < 20
    assert events[-1] == "[DONE]"
    tokens, usage = events[:20], events[20]
    assert len(events) == 22
    assert tokens[0]["choices"][0]["delta"] == {"role": "assistant", "content": " tok0"}
    for i, chunk in enumerate(tokens):
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["id"] == tokens[0]["id"]
        assert chunk["usage"] is None
        (choice,) = chunk["choices"]
        assert choice["delta"]["content"] == f" tok{i}"
        assert choice["finish_reason"] == ("length" if i == 19 else None)
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 4, "completion_tokens": 20, "total_tokens": 24}


async def test_streamed_completion_without_usage(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    sim = await start_sim()
    body = {"prompt": ["one prompt"], "max_tokens": 3, "stream": True}
    async with session.post(f"{sim.url}/v1/completions", json=body) as response:
        events = [data async for data in sse_data(response)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == [" tok0", " tok1", " tok2"]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# --- the other routes ---------------------------------------------------------------------------


async def test_models_and_health(start_sim: StartSim, session: aiohttp.ClientSession) -> None:
    sim = await start_sim()
    async with session.get(f"{sim.url}/v1/models") as response:
        assert await response.json() == {
            "object": "list",
            "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "batchgate-sim"}],
        }
    async with session.get(f"{sim.url}/health") as response:
        assert response.status == 200


async def test_metrics_use_vllm_names_and_track_the_engine(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    sim = await start_sim(SimulatedConfig(time_scale=1.0, max_batch=1))
    body = {"prompt": "x", "max_tokens": 10_000, "stream": True}
    first = await session.post(f"{sim.url}/v1/completions", json=body)
    second = await session.post(f"{sim.url}/v1/completions", json=body)
    await eventually(lambda: (sim.engine.running, sim.engine.waiting) == (1, 1))
    async with session.get(f"{sim.url}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    first.close()
    second.close()
    assert f'vllm:num_requests_running{{model_name="{MODEL}"}} 1.0' in text
    assert f'vllm:num_requests_waiting{{model_name="{MODEL}"}} 1.0' in text
    assert "# TYPE vllm:generation_tokens_total counter" in text
    assert f'vllm:generation_tokens_total{{model_name="{MODEL}"}}' in text


async def test_kv_budget_shows_as_usage_and_preemptions_in_vllm_names(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    sim = await start_sim(SimulatedConfig(time_scale=1.0, kv_tokens=100))
    async with session.get(f"{sim.url}/metrics") as response:
        text = await response.text()
    assert f'vllm:kv_cache_usage_perc{{model_name="{MODEL}"}} 0.0' in text
    assert "# TYPE vllm:num_preemptions_total counter" in text
    assert f'vllm:num_preemptions_total{{model_name="{MODEL}"}} 0.0' in text
    body = {"prompt": [1] * 40, "max_tokens": 60, "stream": True}  # 40 token ids: exact
    stream = await session.post(f"{sim.url}/v1/completions", json=body)
    await eventually(lambda: sim.engine.running == 1)
    async with session.get(f"{sim.url}/metrics") as response:
        text = await response.text()
    stream.close()
    prefix = f'vllm:kv_cache_usage_perc{{model_name="{MODEL}"}} '
    scraped = [float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)]
    # Its 40 prompt tokens and however many it has generated by the scrape, out of 100.
    assert len(scraped) == 1 and 0.4 <= scraped[0] <= 1.0, text


async def test_a_request_past_the_kv_budget_is_an_openai_400(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    sim = await start_sim(SimulatedConfig(kv_tokens=100))
    body = {"prompt": [1] * 40, "max_tokens": 61}
    async with session.post(f"{sim.url}/v1/completions", json=body) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert "exceeds the KV-cache budget of 100 tokens" in error["message"]
    assert sim.engine.total_started == 0


# --- bad requests -----------------------------------------------------------------------------


async def test_bad_json_is_an_openai_400(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    sim = await start_sim()
    async with session.post(f"{sim.url}/v1/chat/completions", data=b"{not json") as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["message"].startswith("The request body is not valid JSON")
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, None)
    assert sim.engine.total_started == 0


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", [1, 2], None),
        ("/v1/completions", {"max_tokens": 3}, "prompt"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "a", "max_tokens": "5"}, "max_tokens"),
        ("/v1/completions", {"prompt": "a", "n": 2}, "n"),
        ("/v1/completions", {"prompt": "a", "stream": "yes"}, "stream"),
        (
            "/v1/completions",
            {"prompt": "a", "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user"}], "max_completion_tokens": -1},
            "max_completion_tokens",
        ),
    ],
)
async def test_bad_fields_are_openai_400s(
    start_sim: StartSim, session: aiohttp.ClientSession, path: str, body: object, param: str | None
) -> None:
    sim = await start_sim()
    async with session.post(f"{sim.url}{path}", json=body) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, None)
    assert sim.engine.total_started == 0


# --- disconnects ------------------------------------------------------------------------------


@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_client_leaving_mid_stream_aborts_its_generation(
    start_sim: StartSim,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    handler_cancellation: bool,
) -> None:
    """Without handler cancellation the next SSE write fails and that ends the generation."""
    caplog.set_level(logging.DEBUG, logger="proxy.sim.server")
    sim = await start_sim(
        SimulatedConfig(time_scale=0.1), handler_cancellation=handler_cancellation
    )
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 10_000, "stream": True}
    response = await session.post(f"{sim.url}/v1/chat/completions", json=body)
    async with aclosing(sse_data(response)) as events:
        first = await anext(events)
    assert json.loads(first)["choices"][0]["delta"]["content"] == " tok0"
    assert sim.engine.running == 1
    response.close()  # drops the connection, not just the response
    await eventually(lambda: sim.engine.running == 0)
    assert (sim.engine.total_aborted, sim.engine.total_finished) == (1, 0)
    assert sim.engine.total_generated_tokens < 10_000
    noticed_by_write = "sim client disconnected mid-stream" in caplog.messages
    assert noticed_by_write is not handler_cancellation


async def test_client_leaving_a_non_streamed_request_aborts_it(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    sim = await start_sim(SimulatedConfig(time_scale=0.1))
    body = {"prompt": "go", "max_tokens": 10_000}
    request = asyncio.create_task(session.post(f"{sim.url}/v1/completions", json=body))
    await eventually(lambda: sim.engine.running == 1)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await eventually(lambda: sim.engine.running == 0)
    assert (sim.engine.total_aborted, sim.engine.total_finished) == (1, 0)
