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

from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .openai_api import ApiError, Response, chat_inputs, completion_inputs, field_error, input_error

log = logging.getLogger("llama_pkg")
RETRY_AFTER_S = 1  # what a 429 asks the client to wait (the SDKs retry it)


class Upstream:
    """The Cog server: one prediction as a stream of (event, data), and its cancel. aiohttp (its C parser)
    reads the SSE: about half the front's CPU per token was httpx's (benchmarks/RESULTS.md)."""

    def __init__(self, url):
        self.url = url.rstrip("/")
        self._session = None

    def session(self):
        if self._session is None:  # made in the serving loop, on first use
            import aiohttp

            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        return self._session

    async def close(self):
        if self._session is not None:
            await self._session.close()

    async def events(self, inputs, prediction_id, renamed=None):
        """(event, data) of the prediction's SSE stream; ApiError when Cog refuses it before it starts."""
        import aiohttp

        try:
            async with self.session().put(f"{self.url}/predictions/{prediction_id}", json={"input": inputs},
                                          headers={"Accept": "text/event-stream"}) as r:
                if r.status != 200:
                    raise await _refusal(r, renamed)
                event, pending = None, b""
                async for data in r.content.iter_any():
                    pending += data
                    *lines, pending = pending.split(b"\n")  # only "\n" ends a line: JSON escapes it in a chunk
                    for line in lines:
                        if line.startswith(b"event: "):
                            event = line[7:].decode().strip()
                        elif line.startswith(b"data: ") and event != "metric":  # the end carries every metric
                            yield event, json.loads(line[6:])
        except aiohttp.ClientConnectorError as e:
            raise ApiError(503, f"the model server at {self.url} cannot be reached ({type(e).__name__})",
                           type="service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except aiohttp.ClientError as e:
            raise ApiError(502, f"the model server's stream broke ({type(e).__name__})", type="api_error") from None

    async def cancel(self, prediction_id):
        import aiohttp

        try:
            async with self.session().post(f"{self.url}/predictions/{prediction_id}/cancel",
                                           timeout=aiohttp.ClientTimeout(total=5)):
                pass
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:  # the prediction ends anyway when its stream closes
            log.warning("cancel of %s failed: %s", prediction_id, e)

    async def health(self):
        import aiohttp

        try:
            async with self.session().get(f"{self.url}/health-check", timeout=aiohttp.ClientTimeout(total=5)) as r:
                return json.loads(await r.read()).get("status", "UNKNOWN")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError):
            return "UNREACHABLE"


async def _refusal(r, renamed):
    text = (await r.read()).decode(errors="replace")
    try:
        body = json.loads(text)
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    if r.status == 409:
        return ApiError(429, "every slot of the model server is busy: retry shortly", type="rate_limit_error",
                        code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
    if r.status == 422:  # Cog's validation: {"detail": [{"loc": [..., "input", name], "msg"}]}
        detail = (body.get("detail") or [{}])[0]
        return field_error(str((detail.get("loc") or ["?"])[-1]), detail.get("msg", "invalid"), renamed)
    if r.status == 503:
        return ApiError(503, f"the model server is not ready: {body.get('detail') or body or text}",
                        type="service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})
    return ApiError(502, f"the model server answered {r.status}: {text[:300]}", type="api_error")


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
    """The Starlette app: upstream (an Upstream) serves predictions; model: the name served."""

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
                if stream:
                    return StreamingResponse(_sse(prediction, response, chunks, first, include_usage),
                                             media_type="text/event-stream",
                                             headers={"Cache-Control": "no-cache", "X-Prediction-Id": prediction.id})
                text = await _unless_gone(request, prediction, _rest(first, chunks))
                return JSONResponse(response.whole(text, prediction.finish_reason, prediction.metrics),
                                    headers={"X-Prediction-Id": prediction.id})
            except ApiError as e:
                return _error(e)
            except Gone:
                return JSONResponse({}, status_code=499)  # nobody reads it

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
    """The stream's events; the role chunk goes out with the first text, the end's events together (each
    write is a wakeup of the client: fewer of them, less time to the first token)."""
    def event(obj):
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    head = event(response.chunk(first=True)) if response.chat else ""
    try:
        if first is not END:
            yield head + event(response.chunk(first))
            head = ""
            async for text in chunks:
                yield event(response.chunk(text))
        tail = head + event(response.chunk(finish_reason=prediction.finish_reason))
        if include_usage:
            tail += event(response.usage_chunk(prediction.metrics))
    except ApiError as e:  # after the 200: the error as an event, as OpenAI's and vLLM's servers send it
        tail = head + event(e.body())
    finally:
        await chunks.aclose()
        if not prediction.done:  # a client gone mid-stream: its prediction is cancelled
            await prediction.upstream.cancel(prediction.id)
    yield tail + "data: [DONE]\n\n"


async def _rest(first, chunks):
    """The whole answer's text, from its first chunk on."""
    parts = [] if first is END else [first]
    async for text in chunks:
        parts.append(text)
    return "".join(parts)


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

    to = Upstream(upstream)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        watcher = asyncio.get_running_loop().create_task(watch_parent()) if parent else None
        yield
        if watcher:
            watcher.cancel()
        await to.close()

    uvicorn.run(make_app(to, model, lifespan), host=host, port=port, log_level="info")
