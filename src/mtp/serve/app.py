"""The ASGI app of ``mtp serve`` (Starlette, server-sent events through sse-starlette) and its uvicorn server.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed or not), ``GET /v1/models``,
``GET /health`` (no key needed: for load balancers) and ``GET /metrics`` (Prometheus text). Every refusal is
an OpenAI error object with a 4xx status; an error inside the server is a 500 for that request only.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass

import torch

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mtp.config import HEAD_METHODS
from mtp.decode.accept import Sampling
from mtp.decode.engine import Request
from mtp.decode.run import choose_method, eos_ids, open_target, resolve_backend
from mtp.errors import UserError
from mtp.io import parse_json
from mtp.machine import in_own_thread
from mtp.serve.protocol import (ApiError, Limits, Params, TextStream, bad, chunk, final_text, new_id, parse,
                                response, usage_chunk)
from mtp.serve.scheduler import Job, Scheduler


@dataclass
class Settings:
    model_names: tuple[str, ...]  # the name /v1/models lists first, then aliases
    limits: Limits
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    timeout: float = 600.0
    fingerprint: str = "mtp"
    eos: tuple[int, ...] = ()
    read_timeout: float = 30.0  # a request's body, once its headers are in (the headers: GuardedH11Protocol)


class Metrics:
    """Prometheus metrics of one server (its own registry)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("mtp_http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.outcomes = Counter("mtp_requests_finished", "Decoding requests by outcome (ok, time_limit: cut at "
                                "--timeout, cancelled, timeout: waited in the queue past it, queue_full, "
                                "shutting_down, decoding_failed, internal_error)", ["outcome"], registry=r)
        self.prompt_tokens = Counter("mtp_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.tokens = Counter("mtp_generation_tokens", "Tokens generated (what usage.completion_tokens sums; "
                              "each request's first one comes from its prefill)", registry=r)
        self.verify_steps = Counter("mtp_verify_steps", "Decoding steps of the running batch", registry=r)
        self.row_steps = Counter("mtp_row_steps", "Rows decoded per step, summed over steps ((generation tokens "
                                 "- one per request) / row_steps = acceptance length)", registry=r)
        self.tokens_per_s = Gauge("mtp_tokens_per_second", "Tokens generated per second over the last 10 s",
                                  registry=r)
        self.acceptance = Gauge("mtp_acceptance_length", "Tokens per row per decoding step over the last 10 s "
                                "(1 = plain decoding)", registry=r)
        self.queue = Gauge("mtp_queue_depth", "Requests waiting for a row", registry=r)
        self.running = Gauge("mtp_running_requests", "Requests being decoded", registry=r)
        buckets = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
        self.ttft = Histogram("mtp_time_to_first_token_seconds", "Submission to first token", buckets=buckets,
                              registry=r)
        self.latency = Histogram("mtp_request_seconds", "Submission to last token", buckets=buckets, registry=r)

    def count(self, name: str, doc: str, read) -> None:
        """A counter kept elsewhere: ``read()`` gives its total whenever /metrics is read."""
        from prometheus_client.core import CounterMetricFamily

        class Reading:
            def collect(self):
                yield CounterMetricFamily(name, doc, value=read())

        self.registry.register(Reading())

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Api:
    """The HTTP side of ``mtp serve``: its handlers over four collaborators (the scheduler that owns the decoder,
    the tokenizer, the settings, the metrics), each a method that can be called and tested on its own; :meth:`app`
    puts them on their routes."""

    def __init__(self, scheduler: Scheduler, tokenizer, settings: Settings, metrics: Metrics):
        self.scheduler, self.tokenizer, self.settings, self.metrics = scheduler, tokenizer, settings, metrics
        self.vocab = len(tokenizer)
        self.created = int(time.time())

    @staticmethod
    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def authorize(self, request) -> None:
        if self.settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        key = self.settings.api_key.encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    async def read_json(self, request):
        length = request.headers.get("content-length")
        if length is not None and not length.isdigit():
            raise bad(f"bad Content-Length header {length[:40]!r}", code="invalid_header")
        if length is not None and int(length) > self.settings.max_body_bytes:
            raise ApiError(413, f"request body larger than {self.settings.max_body_bytes} bytes (--max-body-bytes)",
                           code="body_too_large")
        body = bytearray()
        try:
            async with asyncio.timeout(self.settings.read_timeout):
                async for part in request.stream():
                    body += part
                    if len(body) > self.settings.max_body_bytes:
                        raise ApiError(413, f"request body larger than {self.settings.max_body_bytes} bytes "
                                       "(--max-body-bytes)", code="body_too_large")
        except TimeoutError:  # a client that sends its body a byte at a time holds a connection: not for long
            raise ApiError(408, f"the request body did not arrive within {self.settings.read_timeout:g} s "
                           "(--read-timeout)", code="request_timeout", headers={"Connection": "close"}) from None
        except ClientDisconnect:
            raise ApiError(499, "client closed the request", code="client_closed") from None
        try:
            return parse_json(bytes(body), "the request body", what="is ")
        except UserError as e:  # not JSON, too deep, a 5000-digit number, a lone surrogate
            raise bad(str(e)[:200], code="invalid_json") from None

    def encode(self, p: Params) -> list[int]:
        if p.kind == "chat":
            if not getattr(self.tokenizer, "chat_template", None):
                raise bad("this model has no chat template: use /v1/completions", "messages")
            try:
                text = self.tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # noqa: BLE001 - the template's own complaint (e.g. roles out of order)
                raise bad(f"the model's chat template refused these messages: {str(e)[:200]}", "messages") from None
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if isinstance(p.prompt, list):
            if any(not 0 <= t < self.vocab for t in p.prompt):
                raise bad(f"'prompt' token ids must be in [0, {self.vocab})", "prompt")
            return list(p.prompt)
        return self.tokenizer(p.prompt, add_special_tokens=True)["input_ids"]

    def make_job(self, p: Params, ids: list[int], loop) -> Job:
        lim = self.settings.limits
        if len(ids) > lim.max_prompt_tokens:
            raise bad(f"the prompt is {len(ids)} tokens; this server takes at most {lim.max_prompt_tokens} "
                      f"(--max-prompt-tokens)", "messages" if p.kind == "chat" else "prompt", "prompt_too_long")
        room = (lim.context - len(ids)) if lim.context else lim.max_tokens
        if room < 1:
            raise bad(f"the prompt is {len(ids)} tokens and fills the model's context of {lim.context}",
                      "messages" if p.kind == "chat" else "prompt", "context_length_exceeded")
        max_new = min(room, lim.max_tokens) if p.max_tokens is None else p.max_tokens
        if max_new > room:
            raise bad(f"the prompt is {len(ids)} tokens and {max_new} new tokens were asked for: more than the "
                      f"model's context of {lim.context}", "max_tokens", "context_length_exceeded")
        sampling = Sampling(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p)
        generator = None
        if not sampling.greedy:
            generator = torch.Generator(device=self.scheduler.decoder.device)
            generator.manual_seed(p.seed if p.seed is not None else int.from_bytes(os.urandom(8), "little"))
        request = Request(ids, max_new, frozenset(self.settings.eos), tuple(p.stop), sampling, generator)
        return Job(request, loop, self.settings.timeout, queue=asyncio.Queue())

    async def wait_disconnect(self, request) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    async def collect(self, job: Job, request) -> tuple[list[int], str]:
        """A non-streamed request's tokens and finish; a client that leaves cancels it."""
        tokens: list[int] = []
        gone = asyncio.ensure_future(self.wait_disconnect(request))
        try:
            while True:
                get = asyncio.ensure_future(job.queue.get())
                done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    self.scheduler.cancel(job)
                    raise ApiError(499, "client closed the request", code="client_closed")
                kind, value = get.result()
                if kind == "tokens":
                    tokens += value
                elif kind == "done":
                    return tokens, value
                else:
                    raise value
        except asyncio.CancelledError:
            self.scheduler.cancel(job)
            raise
        finally:
            gone.cancel()

    async def stream(self, job: Job, p: Params, prompt_tokens: int, echo: str | None):
        rid, created = new_id(p.kind), int(time.time())
        text = TextStream(self.tokenizer, p.stop)
        fp = self.settings.fingerprint
        ended = False
        try:
            if p.kind == "chat":
                yield {"data": json.dumps(chunk(p, rid, created, None, None, fp, role=True))}
            if echo:
                yield {"data": json.dumps(chunk(p, rid, created, echo, None, fp))}
            while True:
                kind, value = await job.queue.get()
                if kind == "tokens":
                    new = text.push(value)
                    if new:
                        yield {"data": json.dumps(chunk(p, rid, created, new, None, fp))}
                elif kind == "done":
                    ended = True
                    tail = text.push([], final=True)
                    if tail:
                        yield {"data": json.dumps(chunk(p, rid, created, tail, None, fp))}
                    yield {"data": json.dumps(chunk(p, rid, created, None, value, fp))}
                    if p.include_usage:
                        yield {"data": json.dumps(usage_chunk(p, rid, created, prompt_tokens, len(text.tokens), fp))}
                    yield {"data": "[DONE]"}
                    return
                else:
                    ended = True
                    yield {"data": json.dumps(value.body())}
                    return
        finally:
            if not ended:  # the client went away (or the server is stopping): free the row
                self.scheduler.cancel(job)

    async def completions(self, request, kind: str):
        self.authorize(request)
        p = parse(await self.read_json(request), kind, self.settings.limits)
        if p.model not in self.settings.model_names:
            raise ApiError(404, f"the model {p.model!r} does not exist here: this server serves "
                           f"{self.settings.model_names[0]!r} (see /v1/models)", "model", "model_not_found")
        ids = self.encode(p)
        job = self.make_job(p, ids, asyncio.get_running_loop())
        self.scheduler.submit(job)
        self.metrics.prompt_tokens.inc(len(ids))
        echo = self.tokenizer.decode(ids, skip_special_tokens=True) if p.echo else None
        if p.stream:
            return EventSourceResponse(self.stream(job, p, len(ids), echo), sep="\n", ping=15)
        tokens, finish = await self.collect(job, request)
        text = (echo or "") + final_text(self.tokenizer, tokens, p.stop)
        return JSONResponse(response(p, new_id(kind), text, finish, len(ids), len(tokens),
                                     self.settings.fingerprint))

    def route(self, name: str, handler):
        async def endpoint(request):
            try:
                out = await handler(request)
            except ApiError as e:
                out = self.error_response(e)
            except Exception as e:  # noqa: BLE001 - this request fails, the server goes on
                traceback.print_exc(file=sys.stderr)
                out = self.error_response(ApiError(500, f"internal error: {type(e).__name__}",
                                                   code="internal_error"))
            self.metrics.requests.labels(route=name, status=str(out.status_code)).inc()
            return out
        return endpoint

    async def chat(self, request):
        return await self.completions(request, "chat")

    async def text_completions(self, request):
        return await self.completions(request, "completion")

    def _model(self) -> dict:
        return {"id": self.settings.model_names[0], "object": "model", "created": self.created, "owned_by": "mtp"}

    async def models(self, request):
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self._model()]})

    async def model(self, request):
        """``GET /v1/models/{id}`` (the openai client's ``models.retrieve``): this model, by any name it answers to."""
        self.authorize(request)
        name = request.path_params["name"]
        if name not in self.settings.model_names:
            raise ApiError(404, f"model {name!r} is not served here (this server serves "
                                f"{self.settings.model_names[0]!r})", param="model", code="model_not_found")
        return JSONResponse(self._model())

    async def health(self, request):
        if self.scheduler.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if not self.scheduler.thread.is_alive():
            return JSONResponse({"status": "decoder stopped"}, status_code=503)
        return JSONResponse({"status": "ok", "running": len(self.scheduler.running),
                             "waiting": self.scheduler.queue_depth()})

    async def metrics_text(self, request):
        self.authorize(request)
        return Response(self.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def http_error(self, request, exc: HTTPException):
        error = ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}",
                         code="not_found" if exc.status_code == 404 else "method_not_allowed",
                         type="invalid_request_error")
        return self.error_response(error)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.scheduler.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, self.scheduler.stop)

    def app(self) -> Starlette:
        """The Starlette app: these handlers on their routes; the scheduler starts and stops with it."""
        routes = [
            Route("/v1/chat/completions", self.route("chat", self.chat), methods=["POST"]),
            Route("/v1/completions", self.route("completions", self.text_completions), methods=["POST"]),
            Route("/v1/models", self.route("models", self.models), methods=["GET"]),
            Route("/v1/models/{name:path}", self.route("model", self.model), methods=["GET"]),
            Route("/health", self.route("health", self.health), methods=["GET"]),
            Route("/metrics", self.route("metrics", self.metrics_text), methods=["GET"]),
        ]
        # a route with a trailing slash is the same route (clients do not follow a 307 redirect for POST)
        routes += [Route(r.path + "/", r.endpoint, methods=list(r.methods - {"HEAD"})) for r in list(routes)
                   if not r.path.endswith("}")]
        return Starlette(routes=routes, lifespan=self.lifespan, exception_handlers={HTTPException: self.http_error})


def create_app(scheduler: Scheduler, tokenizer, settings: Settings, metrics: Metrics) -> Starlette:
    """The Starlette app; ``scheduler`` is started and stopped with it (its lifespan)."""
    return Api(scheduler, tokenizer, settings, metrics).app()


# ----------------------------------------------------------------------------- the command


def serve(cfg, command: str = "") -> None:
    """``mtp serve``: load the model and heads, measure nothing twice, serve until SIGTERM / Ctrl-C."""
    import uvicorn
    from sse_starlette.sse import AppStatus

    check_port(cfg.host, cfg.port)  # before the slow part
    heads, method = choose_method(cfg.model, cfg.heads, cfg.method)
    api_key = cfg.api_key if cfg.api_key is not None else (os.environ.get("MTP_API_KEY") or None)
    say = (lambda *a: None) if cfg.quiet else (lambda msg: print(f"mtp serve: {msg}", file=sys.stderr, flush=True))
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        say(f"warning: listening on {cfg.host} without --api-key: anyone who can reach it can use it")

    def load():
        cfg.backend = resolve_backend(cfg, cfg.model, [method], say)
        with_heads = f", heads {heads}" if heads and method in HEAD_METHODS else ""
        runs_on = f"GGUF {cfg.target} on llama.cpp" if cfg.backend == "llama.cpp" else cfg.dtype
        loading = f"loading {cfg.model} ({runs_on}, {method}{with_heads})"
        n_ctx = cfg.ctx_size or llama_ctx_size(cfg.max_batch, cfg.max_prompt_tokens, cfg.max_tokens)
        loaded = open_target(cfg, cfg.model, heads, [method], {"--max-tokens": cfg.max_tokens}, cfg.exit_layer,
                             before_load=lambda: say(loading), n_ctx=n_ctx)
        backbone, tokenizer = loaded.backbone, loaded.tokenizer
        loaded.tokenizer = copy.deepcopy(tokenizer)  # the decoder's own: the event loop encodes with the other
        decoder, _ = loaded.decoder(method, cfg)
        # a server's batch may never empty: on llama.cpp dropped tree cells are freed as they pile up
        if cfg.backend == "llama.cpp":
            backbone.rows.max_dropped = backbone.ctx.n_ctx // 8
        eos = eos_ids(backbone, tokenizer)
        # drafts sized for every batch size the server will run (curves measured once)
        decoder.prepare(cfg.max_batch)
        decoder.generate([tokenizer("Hello", add_special_tokens=False)["input_ids"] or [0]], 4, eos)  # warm-up
        if cfg.backend == "llama.cpp":  # a joining prompt reads the cells of the prefix it shares with a running one
            from mtp.engines.llamacpp_lib import SHARE_PREFIX_MIN

            backbone.rows.share_prefix = SHARE_PREFIX_MIN if cfg.prompt_cache else 0
        return backbone, tokenizer, decoder, eos

    # loading and measuring run on a thread that exits, so that the decoding thread's OpenMP pool is the process's
    # only one (machine.in_own_thread: a second pool throttles every barrier of a decode)
    backbone, tokenizer, decoder, eos = in_own_thread(load)
    context = getattr(backbone.config, "max_position_embeddings", None)
    limits = Limits(max_tokens=cfg.max_tokens, max_prompt_tokens=cfg.max_prompt_tokens, context=context,
                    default_temperature=cfg.temperature, default_top_p=cfg.top_p, default_top_k=cfg.top_k)
    names = tuple(dict.fromkeys([cfg.served_model_name or cfg.model, cfg.model]))
    settings = Settings(names, limits, api_key, cfg.max_body_bytes, cfg.timeout, f"mtp-{method}", tuple(eos),
                        cfg.read_timeout)
    metrics = Metrics()
    if cfg.backend == "llama.cpp":
        metrics.count("mtp_prompt_tokens_reused", "Prompt tokens read from a running request's KV cells instead of "
                      "computed (--prompt-cache)", lambda: backbone.rows.shared_tokens)
    scheduler = Scheduler(decoder, cfg.max_batch, cfg.max_queue, metrics)
    app = create_app(scheduler, tokenizer, settings, metrics)
    AppStatus.disable_automatic_graceful_drain()  # streams end through the scheduler's drain, with an event

    class Server(uvicorn.Server):
        """uvicorn's server, but the first SIGTERM / SIGINT drains: the socket stays open (/health answers 503
        "shutting down", a new completion 503), the requests in flight finish (up to --shutdown-timeout), then it
        stops. A second signal stops it at once."""

        draining = False

        def handle_exit(self, sig, frame):
            if self.draining or self.should_exit:
                super().handle_exit(sig, frame)
            else:
                say(f"{signal.Signals(sig).name}: finishing {len(scheduler.running) + scheduler.queue_depth()} "
                    f"request(s) (up to {cfg.shutdown_timeout:g} s), taking no new ones")
                scheduler.drain(cfg.shutdown_timeout)
                self.draining = True
            # a SIGTERM that stopped the server gracefully ends the process with status 0 (uvicorn would raise
            # it again once stopped); Ctrl-C still ends as an interrupt
            captured = getattr(self, "_captured_signals", None)
            if captured is not None:
                if sig == signal.SIGINT and sig not in captured:
                    captured.append(sig)
                self._captured_signals = [s for s in captured if s != signal.SIGTERM]

        async def on_tick(self, counter: int) -> bool:
            if self.draining and (scheduler.idle or not scheduler.thread.is_alive()):
                self.should_exit = True  # every request has its last event: uvicorn lets their responses end
            return await super().on_tick(counter)

    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=cfg.shutdown_timeout + 5, lifespan="on",
                            http=guarded_protocol(cfg.read_timeout, cfg.max_connections))
    server = Server(config)
    sock = listen(cfg.host, cfg.port)  # bound here: --port 0 announces the port the system chose
    port = sock.getsockname()[1]
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    say(f"serving {names[0]!r} at http://{host}:{port}/v1 (max batch {cfg.max_batch}, queue "
        f"{cfg.max_queue}{', API key required' if api_key else ''})")
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn could not serve after all (it logged why)
        raise UserError(f"cannot listen on {cfg.host}:{port}") from None
    finally:
        sock.close()
    say("stopped")
    return None


def _raw_response(error: ApiError) -> bytes:
    """An error answered below the app (by the HTTP protocol itself), then the connection closes."""
    from http import HTTPStatus

    body = json.dumps(error.body()).encode()
    return (f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\ncontent-type: application/json\r\n"
            f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


def guarded_protocol(read_timeout: float, max_connections: int):
    """uvicorn's h11 protocol with the two bounds it lacks (a slow-loris client otherwise holds a connection as
    long as it likes): a request's headers must arrive within ``read_timeout`` seconds of its first byte (or of
    the connection), else a 408 and the connection closes (nginx's client_header_timeout; the body has its own
    bound, :meth:`Api.read_json`); and at most ``max_connections`` are open, one more is answered 503 and closed."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _headers_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                busy = ApiError(503, f"more than {max_connections} open connections (--max-connections): retry later",
                                code="too_many_connections")
                transport.write(_raw_response(busy))
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            if self._headers_timer is None:
                self._headers_timer = self.loop.call_later(read_timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._headers_timer is not None:
                self._headers_timer.cancel()
                self._headers_timer = None

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:  # a request's first bytes (a new connection, or after keep-alive)
                self._arm()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # its headers are in
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _headers_late(self) -> None:
            self._headers_timer = None
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.transport.write(_raw_response(ApiError(408, f"the request headers did not arrive within "
                                                            f"{read_timeout:g} s (--read-timeout)",
                                                            code="request_timeout")))
                self.transport.close()

    return GuardedH11Protocol


def llama_ctx_size(max_batch: int, max_prompt_tokens: int, max_tokens: int) -> int:
    """``--backend llama.cpp``'s default KV cells: what --max-batch requests of the longest prompt and answer (and a
    tree each) hold, at most 16384."""
    return min(16384, max_batch * (max_prompt_tokens + max_tokens + 64))


def listen(host: str, port: int):
    """A listening socket on ``host:port`` (0: a free port the system picks), as uvicorn would make it."""
    import socket

    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def check_port(host: str, port: int) -> None:
    """Fail in one line, before any model is loaded, if ``host:port`` cannot be listened on."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
