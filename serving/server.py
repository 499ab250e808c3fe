"""An HTTP server for an exported model, speaking TF Serving's REST API (aiohttp).

    python main.py serve --export DIR [--model-name NAME] [--port 8501] [--host 127.0.0.1]

GET  /v1/models                          the model served
GET  /v1/models/NAME[/versions/1]        its status (AVAILABLE)
GET  /v1/models/NAME[/versions/1]/metadata   its signatures
POST /v1/models/NAME[/versions/1]:predict    row ("instances") or columnar ("inputs") JSON
GET  /healthz                            200 once the model is loaded and warmed up

Requests go through the dynamic batcher (serving/batcher.py). Every refused
request gets a JSON `{"error": "..."}` with a 4xx code (503 when the queue is
full) and the server goes on serving. SIGTERM (or Ctrl-C) stops accepting
connections, answers the requests in flight, then exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import pathlib
import signal
import socket
import sys
import time
from typing import Any

from aiohttp import web

from serving.batcher import Batcher, QueueFull
from serving.model import ServedModel, read_export
from serving.rest import BadRequest, answer, parse
from utils.errors import UserError

log = logging.getLogger("serving")
SHUTDOWN_TIMEOUT_S = 60.0  # longest wait for requests in flight after SIGTERM


def error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every refusal as TF Serving does it: a JSON object with an "error" message."""
    try:
        return await handler(request)
    except BadRequest as e:
        return error(e.status, str(e))
    except QueueFull as e:
        return error(503, str(e), **{"Retry-After": "1"})
    except web.HTTPRequestEntityTooLarge:
        limit = request.app["max_request_bytes"]
        return error(413, f"request body larger than --max-request-bytes {limit}")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status == 404:
            return error(404, f"no such endpoint: {request.method} {request.path}")
        if e.status == 405:
            return error(405, f"method {request.method} not allowed on {request.path}")
        return error(e.status, e.reason)
    except Exception as e:  # a bug: the client still gets JSON, the log gets the traceback
        log.exception("%s %s failed", request.method, request.path)
        return error(500, f"internal error: {type(e).__name__}: {e}")


class Endpoints:
    """The handlers, around one loaded model and its batcher."""

    def __init__(self, model: ServedModel, name: str, batcher: Batcher):
        self.model, self.name, self.batcher = model, name, batcher
        self.in_flight = 0

    def _check(self, request: web.Request) -> None:
        name = request.match_info["name"]
        version = request.match_info.get("version", "1")
        if name != self.name:
            raise BadRequest(f"model {name!r} not found; this server serves {self.name!r}", 404)
        if version != "1":
            raise BadRequest(f"model {name!r} has no version {version}; it has version 1", 404)

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness, and counters that show the batching at work."""
        return web.json_response(
            {
                "status": "ok",
                "model": self.name,
                "in_flight": self.in_flight,
                "queued_rows": self.batcher.queued_rows,
                "model_calls": self.batcher.batches,
                "rows": self.batcher.rows,
            }
        )

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [{"name": self.name, "versions": ["1"]}]})

    async def status(self, request: web.Request) -> web.Response:
        self._check(request)
        ok = {"error_code": "OK", "error_message": ""}
        state = {"version": "1", "state": "AVAILABLE", "status": ok}
        return web.json_response({"model_version_status": [state]})

    async def metadata(self, request: web.Request) -> web.Response:
        self._check(request)
        return web.json_response(self.model.metadata(self.name))

    async def predict(self, request: web.Request) -> web.Response:
        self._check(request)
        limit = request.app["max_request_bytes"]
        if request.content_length is not None and request.content_length > limit:
            return error(
                413,
                f"request body of {request.content_length} bytes is over --max-request-bytes {limit}",
            )
        self.in_flight += 1
        try:
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise
            except Exception as e:  # the client went away mid-body: nobody to answer
                raise BadRequest(f"incomplete request body ({type(e).__name__})") from None
            body = decode_json(raw)
            parsed = parse(body, self.model.signatures, self.model.meta)
            if parsed.rows > self.batcher.max_queue:  # could never be queued: not a busy server
                raise BadRequest(
                    f"the request has {parsed.rows} rows; the most one request may have is "
                    f"--max-queue {self.batcher.max_queue}"
                )
            try:
                outputs = await self.batcher.submit(
                    parsed.signature.name, parsed.inputs, parsed.rows
                )
            except Exception as e:
                if type(e).__name__ == "InvalidArgumentError":  # TensorFlow refused the input
                    raise BadRequest(f"the model refused the input: {tf_reason(e)}") from None
                raise
            return web.json_response(answer(outputs, parsed.columnar))
        finally:
            self.in_flight -= 1


def tf_reason(error: Exception) -> str:
    """The informative line of a TensorFlow op error (not "Graph execution error", not the node)."""
    lines = [line.strip() for line in str(getattr(error, "message", error)).splitlines()]
    noise = ("Graph execution error", "Detected at node", "<stack traces", "[[{{node")
    useful = [line for line in lines if line and not line.startswith(noise)]
    return useful[0].split(" [Op:")[0] if useful else type(error).__name__


def decode_json(raw: bytes) -> Any:
    """The request body as JSON; BadRequest naming the problem (empty, not UTF-8, malformed)."""
    if not raw.strip():
        raise BadRequest("empty request body; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(
            f"request body is not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRequest(f"malformed JSON: {e}") from None
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply") from None


def make_app(endpoints: Endpoints, max_request_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_request_bytes, middlewares=[json_errors])
    app["max_request_bytes"] = max_request_bytes
    name, version = "{name:[^/:]+}", "{version:[^/:]+}"
    e = endpoints
    app.router.add_get("/healthz", e.healthz)
    app.router.add_get("/v1/models", e.models)
    for prefix in (f"/v1/models/{name}", f"/v1/models/{name}/versions/{version}"):
        app.router.add_get(prefix, e.status)
        app.router.add_get(f"{prefix}/metadata", e.metadata)
        app.router.add_post(f"{prefix}:predict", e.predict)
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, made before the model loads: a taken port fails at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(1024)
    except OSError as e:
        sock.close()
        why = (
            "the port is in use; choose another with --port"
            if e.errno == errno.EADDRINUSE
            else e.strerror
        )
        raise UserError(f"cannot listen on {host}:{port}: {why}") from None
    sock.setblocking(False)
    return sock


def check_options(
    max_batch: int, batch_timeout_ms: float, max_queue: int, max_request_bytes: int, port: int
) -> None:
    """The numeric options in their ranges; UserError naming the first that is not."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: must be 0..65535")
    if max_batch < 1:
        raise UserError(f"--max-batch {max_batch}: must be at least 1")
    if batch_timeout_ms < 0:
        raise UserError(f"--batch-timeout-ms {batch_timeout_ms}: must be >= 0")
    if max_queue < 1:
        raise UserError(f"--max-queue {max_queue}: must be at least 1")
    if max_request_bytes < 1024:
        raise UserError(f"--max-request-bytes {max_request_bytes}: must be at least 1024")


def _stop_before_serving(signum: int, frame: Any) -> None:
    """SIGTERM while loading: no request is in flight yet, so stop at once, with exit 0."""
    raise SystemExit(0)


def serve(
    export: str,
    model_name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8501,
    max_batch: int = 32,
    batch_timeout_ms: float = 5.0,
    max_queue: int = 1024,
    max_request_bytes: int = 1 << 20,
) -> None:
    """Check the options and the export, bind, load and warm up the model, serve until SIGTERM.

    `model_name` (the NAME of /v1/models/NAME) defaults to the export directory's name.
    """
    model_name = model_name or pathlib.Path(export).resolve().name
    check_options(max_batch, batch_timeout_ms, max_queue, max_request_bytes, port)
    read_export(export)  # before the slow part: a wrong directory fails at once
    sock = bind(host, port)
    signal.signal(signal.SIGTERM, _stop_before_serving)
    started = time.perf_counter()
    model = ServedModel(export)
    for signature in model.signatures:
        model.call(signature, model.example(signature))  # traces and warms up each signature
    bound = sock.getsockname()[1]
    print(
        f"serving {model_name!r} ({model.task or 'model'}; signatures: {', '.join(model.signatures)}) "
        f"from {export} on http://{host}:{bound} (loaded in {time.perf_counter() - started:.1f} s; "
        f"batches of <= {max_batch} rows, {batch_timeout_ms:g} ms window)",
        flush=True,
    )
    asyncio.run(
        _serve(sock, model, model_name, max_batch, batch_timeout_ms, max_queue, max_request_bytes)
    )
    print("server stopped", flush=True)


async def _serve(
    sock: socket.socket,
    model: ServedModel,
    model_name: str,
    max_batch: int,
    batch_timeout_ms: float,
    max_queue: int,
    max_request_bytes: int,
) -> None:
    batcher = Batcher(model.call, max_batch, batch_timeout_ms / 1000, max_queue)
    endpoints = Endpoints(model, model_name, batcher)
    runner = web.AppRunner(
        make_app(endpoints, max_request_bytes),
        access_log=None,
        handle_signals=False,
        handler_cancellation=True,  # a client that leaves cancels its rows if still queued
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    await web.SockSite(runner, sock).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    print(
        f"stopping: answering {endpoints.in_flight} requests in flight", file=sys.stderr, flush=True
    )
    try:
        await runner.cleanup()  # closes the socket, waits for the handlers in flight
    finally:
        with contextlib.suppress(Exception):
            await batcher.close()
