"""An OpenAI-compatible HTTP server on :class:`~proxy.sim.engine.SimEngine`: a fake vLLM.

It answers ``/v1/completions`` and ``/v1/chat/completions`` (streamed or not), ``/v1/models``,
``/health`` and ``/metrics`` (vLLM's metric names), with vLLM-like batching latency, so the
proxy can be tested and benchmarked without a GPU. Tokens are fake words (`` tok0``,
`` tok1``...); every generation runs to ``max_tokens`` (``finish_reason`` "length").

Prompt tokens are estimated as whitespace-separated words (token-id lists count as their
length); only the prompt cost (``prompt_ms_per_token``) and the ``usage`` figures depend on it.

A client that disconnects aborts its generation. Streams notice at the latest on their next
write; a non-streamed request is only noticed if the server cancels handlers of lost
connections, i.e. runs with ``web.AppRunner(app, handler_cancellation=True)`` as
:func:`serve_sim` does. Without it the engine keeps generating for nobody until ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import aclosing, suppress
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from proxy.config import SimulatedConfig
from proxy.sim.engine import EngineClosed, SimEngine

logger = logging.getLogger(__name__)

SIM_ENGINE_KEY = web.AppKey("SIM_ENGINE_KEY", SimEngine)
#: How long :func:`serve_sim` lets in-flight generations finish when it is cancelled.
SHUTDOWN_GRACE_S = 5.0


class InvalidRequest(Exception):
    """A request body the OpenAI API would refuse with 400; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class Job:
    """What a completion request asks of the engine, parsed once at the edge."""

    chat: bool
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool


def parse_job(raw: bytes, *, chat: bool, default_max_tokens: int) -> Job:
    """Validate an OpenAI (chat) completion body; raise :class:`InvalidRequest` if unusable.

    Sampling fields (temperature, stop...) and ``model`` are accepted and ignored.
    """
    try:
        body = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if chat:
        prompt_tokens = _count_messages(body.get("messages"))
        # max_completion_tokens replaced max_tokens in the chat API; it wins when both are set.
        key = "max_tokens"
        if body.get("max_completion_tokens") is not None:
            key = "max_completion_tokens"
    else:
        prompt_tokens = _count_prompt(body.get("prompt"))
        key = "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise InvalidRequest(f"{key} must be an integer >= 1. Got {max_tokens!r}.", key)
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise InvalidRequest(f"Only n=1 is supported. Got {n!r}.", "n")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(f"stream must be a boolean. Got {stream!r}.", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidRequest("stream_options must be an object.", "stream_options")
        if not stream:
            raise InvalidRequest(
                "stream_options is only allowed when stream is true.", "stream_options"
            )
        usage = options.get("include_usage")
        if usage is not None and not isinstance(usage, bool):
            raise InvalidRequest(
                f"include_usage must be a boolean. Got {usage!r}.", "stream_options"
            )
        include_usage = bool(usage)
    return Job(chat, prompt_tokens, max_tokens, bool(stream), include_usage)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count_prompt(prompt: object) -> int:
    if isinstance(prompt, str):
        return len(prompt.split())
    if isinstance(prompt, list) and prompt:
        if all(_is_int(t) for t in prompt):
            return len(prompt)  # token ids
        if len(prompt) == 1:
            return _count_prompt(prompt[0])
        raise InvalidRequest("Only one prompt per request is supported.", "prompt")
    raise InvalidRequest(
        "prompt must be a string, a list of token ids, or a list holding one of those.", "prompt"
    )


def _count_messages(messages: object) -> int:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list.", "messages")
    words = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"messages[{i}] must be an object with a role.", "messages")
        content = message.get("content")
        if isinstance(content, str):
            words += len(content.split())
        elif isinstance(content, list):  # content parts; only text parts cost prompt tokens
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    words += len(part["text"].split())
        elif content is not None:
            raise InvalidRequest(f"messages[{i}].content must be a string or a list.", "messages")
    return words


def token_text(index: int) -> str:
    return f" tok{index}"


def _usage(job: Job, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": job.prompt_tokens + completion_tokens,
    }


def _error_response(status: int, message: str, type_: str, param: str | None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": None}}
    return web.json_response(body, status=status)


def _sse(payload: object) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class _EngineCollector(Collector):
    """Reads the engine's state at scrape time, under the names vLLM exports."""

    def __init__(self, engine: SimEngine, model: str) -> None:
        self._engine = engine
        self._model = model

    def collect(self) -> Iterable[Metric]:
        engine, labels = self._engine, [self._model]
        running = GaugeMetricFamily(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            labels=["model_name"],
        )
        running.add_metric(labels, engine.running)
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            labels=["model_name"],
        )
        waiting.add_metric(labels, engine.waiting)
        generated = CounterMetricFamily(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            labels=["model_name"],
        )
        generated.add_metric(labels, engine.total_generated_tokens)
        prompt = CounterMetricFamily(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", labels=["model_name"]
        )
        prompt.add_metric(labels, engine.total_prompt_tokens)
        kv = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            labels=["model_name"],
        )
        kv.add_metric(labels, engine.kv_usage)  # 0 with no --kv-tokens budget
        preemptions = CounterMetricFamily(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine.",
            labels=["model_name"],
        )
        preemptions.add_metric(labels, engine.preemptions)
        return [running, waiting, generated, prompt, kv, preemptions]


class _SimHandlers:
    """The route handlers; they reach the engine through ``self``, not through app state."""

    def __init__(self, engine: SimEngine, model: str) -> None:
        self.engine = engine
        self.model = model
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, model))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def _complete(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            job = parse_job(
                await request.read(),
                chat=chat,
                default_max_tokens=self.engine.config.default_max_tokens,
            )
        except InvalidRequest as exc:
            return _error_response(400, exc.message, "invalid_request_error", exc.param)
        if not self.engine.fits(job.prompt_tokens, job.max_tokens):
            # vLLM refuses a request longer than the context its cache can hold, with a 400.
            return _error_response(
                400,
                f"prompt ({job.prompt_tokens} tokens) + max_tokens ({job.max_tokens}) exceeds"
                f" the KV-cache budget of {self.engine.config.kv_tokens} tokens",
                "invalid_request_error", "max_tokens",
            )
        prefix = "chatcmpl" if chat else "cmpl"
        head = {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": self.model,
        }
        tokens = self.engine.generate(job.prompt_tokens, job.max_tokens)
        if job.stream:
            return await self._stream(request, job, head, tokens)
        try:
            async with aclosing(tokens):
                completion = "".join([token_text(i) async for i in tokens])
        except EngineClosed as exc:
            return _error_response(503, str(exc), "service_unavailable", None)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
        if chat:
            choice["message"] = {"role": "assistant", "content": completion}
        else:
            choice["text"] = completion
        return web.json_response(
            {
                **head,
                "object": "chat.completion" if chat else "text_completion",
                "choices": [choice],
                "usage": _usage(job, job.max_tokens),
            }
        )

    async def _stream(
        self,
        request: web.Request,
        job: Job,
        head: dict[str, Any],
        tokens: AsyncGenerator[int, None],
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        chunk_head = {**head, "object": "chat.completion.chunk" if job.chat else "text_completion"}
        if job.include_usage:
            chunk_head["usage"] = None  # as OpenAI: null on every chunk but the last
        last = job.max_tokens - 1
        try:
            async with aclosing(tokens):
                async for i in tokens:
                    choice: dict[str, Any] = {
                        "index": 0,
                        "logprobs": None,
                        "finish_reason": "length" if i == last else None,
                    }
                    if not job.chat:
                        choice["text"] = token_text(i)
                    elif i == 0:
                        choice["delta"] = {"role": "assistant", "content": token_text(i)}
                    else:
                        choice["delta"] = {"content": token_text(i)}
                    # One event per token, written straight to the transport: no buffering.
                    await response.write(_sse({**chunk_head, "choices": [choice]}))
            if job.include_usage:
                usage = _usage(job, job.max_tokens)
                await response.write(_sse({**chunk_head, "choices": [], "usage": usage}))
            await response.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            # The client left; aclosing has already taken the request out of the batch.
            logger.debug("sim client disconnected mid-stream")
        except EngineClosed as exc:
            error = {
                "error": {
                    "message": str(exc),
                    "type": "service_unavailable",
                    "param": None,
                    "code": None,
                }
            }
            with suppress(ConnectionResetError):
                await response.write(_sse(error))
        return response

    async def models(self, request: web.Request) -> web.Response:
        model = {"id": self.model, "object": "model", "created": 0, "owned_by": "batchgate-sim"}
        return web.json_response({"object": "list", "data": [model]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4}
        )


def create_sim_app(config: SimulatedConfig, *, model: str = "batchgate-sim") -> web.Application:
    """A fake vLLM server. The engine lives under :data:`SIM_ENGINE_KEY`; its loop runs from
    startup to cleanup. Serve it with ``handler_cancellation=True`` (see the module docstring).
    """
    engine = SimEngine(config)
    handlers = _SimHandlers(engine, model)
    app = web.Application()
    app[SIM_ENGINE_KEY] = engine

    async def engine_lifetime(app: web.Application) -> AsyncIterator[None]:
        app[SIM_ENGINE_KEY].start()
        yield
        await app[SIM_ENGINE_KEY].aclose()

    app.cleanup_ctx.append(engine_lifetime)
    app.router.add_post("/v1/completions", handlers.completions)
    app.router.add_post("/v1/chat/completions", handlers.chat_completions)
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_get("/health", handlers.health)
    app.router.add_get("/metrics", handlers.metrics)
    return app


async def serve_sim(
    config: SimulatedConfig, host: str, port: int, *, model: str = "batchgate-sim"
) -> None:
    """Serve :func:`create_sim_app` on ``host:port`` until cancelled or SIGTERM, then stop.

    Handlers of lost connections are cancelled, so disconnecting clients free their batch
    slot. On cancellation the listener closes first, in-flight requests get
    :data:`SHUTDOWN_GRACE_S` to finish, then the engine stops.
    """
    runner = web.AppRunner(
        create_sim_app(config, model=model),
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_GRACE_S,
        access_log=None,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with suppress(NotImplementedError, RuntimeError):  # not on the main thread: no signals
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        logger.info("sim engine serving on %s (%s)", site.name, config)
        await stop.wait()
    finally:
        await runner.cleanup()
