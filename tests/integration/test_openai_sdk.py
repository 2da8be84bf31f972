"""The real `openai` SDK against batchgate, with the embedded simulated engine behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from openai import AsyncOpenAI

from proxy.config import Config, ReplicaConfig, ServerConfig, SimulatedConfig
from proxy.server import embedded_replicas
from tests.integration.conftest import Proxy

Factory = Callable[..., Any]


@pytest.fixture
async def sdk(proxy: Factory) -> AsyncIterator[AsyncOpenAI]:
    config = Config(
        replicas=(
            ReplicaConfig(
                name="sim-0",
                max_concurrency=4,
                simulated=SimulatedConfig(max_batch=4, time_scale=0.01),
            ),
        ),
        server=ServerConfig(host="127.0.0.1", port=0),
    )
    async with embedded_replicas(config) as resolved:
        p: Proxy = await proxy(resolved)
        client = AsyncOpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0)
        yield client
        await client.close()


async def test_streamed_chat_with_usage(sdk: AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="sim-0",
        messages=[{"role": "user", "content": "say five words"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    text = ""
    usage = None
    chunks = 0
    async for chunk in stream:
        chunks += 1
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == " tok0 tok1 tok2 tok3 tok4"
    assert chunks == 6  # five tokens, one usage chunk
    assert usage is not None and usage.completion_tokens == 5 and usage.prompt_tokens == 3


async def test_completion(sdk: AsyncOpenAI) -> None:
    completion = await sdk.completions.create(model="sim-0", prompt="hello there", max_tokens=3)
    assert completion.choices[0].text == " tok0 tok1 tok2"
    assert completion.usage is not None and completion.usage.total_tokens == 5


async def test_models_list(sdk: AsyncOpenAI) -> None:
    models = await sdk.models.list()
    assert [m.id for m in models.data] == ["sim-0"]
