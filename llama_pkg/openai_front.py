"""`llama-pkg openai --upstream URL`: an OpenAI-compatible HTTP front for the package's Cog server (Cog's own
issue for such endpoints, replicate/cog#1593, was closed as not on its roadmap). Each request is one Cog
prediction on the upstream, streamed over Cog's SSE: the Cog container stays as it is and the front runs
beside it (a sidecar) or in front of it. Cog's 409 (every slot busy) becomes 429 with Retry-After, an
upstream that is not ready 503, and a client that goes away cancels its prediction.
"""

import asyncio
import contextlib
import json
import logging
import uuid

import httpx
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .openai_api import ApiError, Response, chat_inputs, completion_inputs, field_error, input_error

log = logging.getLogger("llama_pkg")
RETRY_AFTER_S = 1  # what a 429 asks the client to wait (the SDKs retry it)


class Upstream:
    """The Cog server: one prediction as a stream of (event, data), and its cancel."""

    def __init__(self, url, client=None):
        self.url = url.rstrip("/")
        self.client = client or httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))

    async def events(self, inputs, prediction_id, renamed=None):
        """(event, data) of the prediction's SSE stream; ApiError when Cog refuses it before it starts."""
        try:
            async with self.client.stream("PUT", f"{self.url}/predictions/{prediction_id}", json={"input": inputs},
                                          headers={"Accept": "text/event-stream"}) as r:
                if r.status_code != 200:
                    raise await _refusal(r, renamed)
                event = None
                async for line in r.aiter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        yield event, json.loads(line[6:])
        except httpx.TransportError as e:
            raise ApiError(503, f"the model server at {self.url} cannot be reached ({type(e).__name__})",
                           type="service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    async def cancel(self, prediction_id):
        try:
            await self.client.post(f"{self.url}/predictions/{prediction_id}/cancel", timeout=5)
        except httpx.HTTPError as e:  # the prediction ends anyway when its stream closes
            log.warning("cancel of %s failed: %s", prediction_id, e)

    async def health(self):
        try:
            r = await self.client.get(f"{self.url}/health-check", timeout=5)
            return r.json().get("status", "UNKNOWN")
        except (httpx.HTTPError, ValueError):
            return "UNREACHABLE"


async def _refusal(r, renamed):
    await r.aread()
    try:
        body = r.json()
    except ValueError:
        body = {}
    if r.status_code == 409:
        return ApiError(429, "every slot of the model server is busy: retry shortly", type="rate_limit_error",
                        code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
    if r.status_code == 422:  # Cog's validation: {"detail": [{"loc": [..., "input", name], "msg"}]}
        detail = (body.get("detail") or [{}])[0]
        return field_error(str((detail.get("loc") or ["?"])[-1]), detail.get("msg", "invalid"), renamed)
    if r.status_code == 503:
        return ApiError(503, f"the model server is not ready: {body.get('detail') or body or r.text}",
                        type="service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})
    return ApiError(502, f"the model server answered {r.status_code}: {r.text[:300]}", type="api_error")


class Prediction:
    """One request's prediction: the text as it streams, then its end (finish reason, metering)."""

    def __init__(self, upstream, inputs, renamed):
        self.upstream, self.inputs, self.renamed = upstream, inputs, renamed
        self.id = "oai-" + uuid.uuid4().hex
        self.metrics, self.finish_reason, self.done = {}, None, False

    async def chunks(self):
        """The text chunks; ApiError for a prediction that fails before its first chunk is sent."""
        async for event, data in self.upstream.events(self.inputs, self.id, self.renamed):
            if event == "output":
                yield data["chunk"]
            elif event == "completed":
                self.done, self.metrics = True, data.get("metrics") or {}
                if data.get("status") == "failed":
                    error = data.get("error") or "the prediction failed"
                    raise input_error(error, self.renamed) or ApiError(500, error, type="api_error")
                if data.get("status") != "succeeded":
                    raise ApiError(500, f"the prediction ended {data.get('status')}", type="api_error")
                self.finish_reason = self.metrics.get("finish_reason")  # null from a server that records none
                return
        raise ApiError(502, "the model server's stream ended before the prediction did", type="api_error")


def make_app(upstream, model, lifespan=None):
    """The Starlette app: upstream (an Upstream or its URL) serves predictions; model: the name served."""
    upstream = upstream if isinstance(upstream, Upstream) else Upstream(upstream)

    async def models(request):
        return JSONResponse({"object": "list", "data": [_model_card(model)]})

    async def one_model(request):
        if request.path_params["name"] != model:
            return _error(ApiError(404, f"The model `{request.path_params['name']}` does not exist", param="model",
                                   code="model_not_found"))
        return JSONResponse(_model_card(model))

    async def health(request):
        status = await upstream.health()
        ok = status in ("READY", "BUSY")  # BUSY: every slot taken, still serving (429 until one frees)
        return JSONResponse({"status": status, "upstream": upstream.url}, status_code=200 if ok else 503)

    def endpoint(parse, chat):
        async def handle(request):
            try:
                try:
                    body = await request.json()
                except ValueError:
                    raise ApiError(400, "the request body is not valid JSON") from None
                inputs, stream, include_usage, renamed = parse(body, model)
                prediction = Prediction(upstream, inputs, renamed)
                response = Response(chat, model)
                chunks = prediction.chunks()
                first = await _unless_gone(request, prediction, _first(chunks))  # errors before it: HTTP errors
            except ApiError as e:
                return _error(e)
            except Gone:
                return JSONResponse({}, status_code=499)  # nobody reads it
            if stream:
                return StreamingResponse(_sse(prediction, response, chunks, first, include_usage),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Prediction-Id": prediction.id})
            return await _whole(request, prediction, response, chunks, first)

        return handle

    return Starlette(routes=[
        Route("/v1/chat/completions", endpoint(chat_inputs, True), methods=["POST"]),
        Route("/v1/completions", endpoint(completion_inputs, False), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", one_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ], lifespan=lifespan)


def _model_card(model):
    return {"id": model, "object": "model", "created": 0, "owned_by": "llama-pkg"}


def _error(e):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


END = object()


async def _first(chunks):
    """The first chunk (END when the answer is empty), so that a refusal is known before answering 200."""
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return END


async def _sse(prediction, response, chunks, first, include_usage):
    def event(obj):
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        if response.chat:
            yield event(response.chunk(first=True))
        if first is not END:
            yield event(response.chunk(first))
            async for text in chunks:
                yield event(response.chunk(text))
        yield event(response.chunk(finish_reason=prediction.finish_reason))
        if include_usage:
            yield event(response.usage_chunk(prediction.metrics))
    except ApiError as e:  # after the 200: the error as an event, as OpenAI's and vLLM's servers send it
        yield event(e.body())
    finally:
        await chunks.aclose()
        if not prediction.done:  # a client gone mid-stream: its prediction is cancelled
            await prediction.upstream.cancel(prediction.id)
    yield "data: [DONE]\n\n"


async def _whole(request, prediction, response, chunks, first):
    """The whole answer, or a cancel when the client goes away first."""
    async def collect():
        parts = [] if first is END else [first]
        async for text in chunks:
            parts.append(text)
        return "".join(parts)

    try:
        text = await _unless_gone(request, prediction, collect())
    except ApiError as e:
        return _error(e)
    except Gone:
        return JSONResponse({}, status_code=499)
    return JSONResponse(response.whole(text, prediction.finish_reason, prediction.metrics),
                        headers={"X-Prediction-Id": prediction.id})


class Gone(Exception):
    """The client went away before its answer (its prediction is cancelled)."""


async def _unless_gone(request, prediction, work):
    """The awaitable `work`'s result, or Gone once the client disconnects first: then `work` is cancelled
    (closing the upstream stream) and so is the prediction (also when it still waits for a slot)."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watching = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    done, _ = await asyncio.wait({work, watching}, return_when=asyncio.FIRST_COMPLETED)
    if work not in done:
        work.cancel()
        await prediction.upstream.cancel(prediction.id)
        raise Gone
    watching.cancel()
    return work.result()


def serve(upstream, host="127.0.0.1", port=8000, model="llama-2-7b-chat", parent=None):
    """Serve until stopped; parent: a process id whose end ends this one too (`serve --openai-port`)."""
    import os

    import uvicorn

    async def watch_parent():
        while os.getppid() == parent:
            await asyncio.sleep(1)
        os._exit(0)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        watcher = asyncio.get_running_loop().create_task(watch_parent()) if parent else None
        yield
        if watcher:
            watcher.cancel()

    uvicorn.run(make_app(upstream, model, lifespan), host=host, port=port, log_level="info")
