"""`mad serve`: an OpenAI-compatible HTTP server with batched decoding and a recurrent prefix cache.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (server-sent events with `stream`),
`GET /v1/models`, `GET /health`. Requests from all clients are decoded together: one engine thread owns
MLX and runs a `BatchGenerator` (each prompt read alone, then one token per step for the whole batch),
the event loop only parses requests and streams what the engine hands it. A `PromptCache` keeps state
snapshots of recent prompts, so a prompt that shares a prefix with an earlier one reads only the rest.

The stack is Starlette on uvicorn (the `serve` extra): both are small, maintained by the Encode team,
and what FastAPI runs on; FastAPI itself would add its own 422 error bodies and an OpenAPI page, while
this API's errors must look like OpenAI's (`{"error": {"message", "type", "param", "code"}}`) and its
request models are pydantic models validated here. Streaming is Starlette's `StreamingResponse`.

Bad input is an HTTP 4xx with such a body, never a crash: malformed JSON, a wrong field, an unknown model,
a body over `max_body_bytes` (413, read no further), too many choices, tokens outside the vocabulary.
A client that disconnects frees its rows at the next decode step.

Speed and exactness: the engine decodes at a few batch sizes only (`mad.generate.decode_bucket`) and reads
prompts in calls of a few shapes (`mad.generate.next_prompt_end`), so the compiled program is traced a
bounded number of times however clients come and go. On a GPU every linear of a decode step runs MAD's
row-independent kernel (`kernels.linear_device.batch_invariant`), so at temperature 0 a client gets the
tokens it would get alone, whoever shares its steps.
"""

from __future__ import annotations

import asyncio
import json
import math
import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .chat_template import DEFAULT_TEMPLATE, ChatTemplate, TemplateError, load_chat_template
from .errors import MadError, printable
from .generate import MAX_TOP_LOGPROBS, BatchGenerator, BatchResult, SamplingParams
from .prompt_cache import DEFAULT_BYTES, PromptCache
from .tokenizers import StreamingDetokenizer

MAX_CHOICES = 16  # n times the number of prompts, per request
MAX_STOP = 4  # stop strings per request (as OpenAI)
MAX_STOP_CHARS = 256  # each; text is held back while it may begin one
MAX_BODY_BYTES = 16 << 20  # a request body; a 100,000-token prompt is well under 1 MB
DRAIN_FACTOR = 64  # a body over the limit is still read (and dropped) up to this many times the limit


# ------------------------------------------------------------------------------------------- errors
class ApiError(Exception):
    """An error answered as HTTP `status` with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _validation_error(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    msg = err["msg"].removeprefix("Value error, ")
    return ApiError(400, f"{param}: {msg}" if param else msg, param)


# ------------------------------------------------------------------------------------------- requests
class _Request(BaseModel):
    """Fields common to both endpoints; unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
    top_p: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: Optional[dict] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**64)
    # accepted only at their neutral values: silently ignoring them would change what a client asked for
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Any) -> Any:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence has at most {MAX_STOP_CHARS} characters")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: Any) -> Any:
        if v not in (None, 0, 0.0):
            raise ValueError("not supported by this server (give 0 or leave it out)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: Any) -> Any:
        if v:
            raise ValueError("not supported by this server")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and (not v or any(isinstance(p, (str, list)) and not p for p in v)):
            raise ValueError("the prompt is empty")
        if v == "":
            raise ValueError("the prompt is empty")
        return v

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported(cls, v: Any) -> Any:
        if v:
            raise ValueError("not supported by this server")
        return v

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: Any) -> Any:
        if v not in (None, 1):
            raise ValueError("not supported by this server (give 1 or leave it out)")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[dict]]] = None
    name: Optional[str] = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        for part in v if isinstance(v, list) else []:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported ({'type': 'text', 'text': ...})")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part["text"] for part in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list] = None
    response_format: Optional[dict] = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: Any) -> Any:
        if v:
            raise ValueError("tool calls are not supported by this server")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, v: Any) -> Any:
        if v and v.get("type") != "text":
            raise ValueError("only {'type': 'text'} is supported by this server")
        return v


# ------------------------------------------------------------------------------------------- the engine
@dataclass(eq=False)
class Job:
    """One request: its prompts (ids), the sampling of each of its n choices per prompt, and where events go.

    `emit(event)` is called from the engine thread: ("token", choice, text, logprob entry or None),
    ("done", choice, finish_reason, completion_tokens), ("error", message). Choice c belongs to prompt c // n.
    """

    prompts: list[list[int]]
    params: list[SamplingParams]  # one per choice of a prompt (n)
    max_tokens: int
    stops: list[str]
    emit: Callable[[tuple], None]
    cuts: tuple[int, ...] = ()  # where the prompt's forward calls end (the end of a chat's system part)
    cached_tokens: list[int] = field(default_factory=list)  # per prompt, known once it was read
    uids: list[int] = field(default_factory=list)


@dataclass(eq=False)
class _Choice:
    job: Job
    index: int
    detok: StreamingDetokenizer
    text: str = ""  # produced and not yet handed out (held back while it may begin a stop string)
    tokens: int = 0


class Engine:
    """The thread that owns MLX: it admits jobs into one `BatchGenerator` (at most `max_batch` rows),
    steps it, turns tokens into text (stop strings, logprobs) and hands events to each job's `emit`."""

    def __init__(self, model: Any, tokenizer: Any, max_batch: int = 32, prompt_cache_bytes: int = DEFAULT_BYTES,
                 make_generator: Optional[Callable[..., Any]] = None):
        import mlx.core as mx

        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.cache = PromptCache(prompt_cache_bytes) if prompt_cache_bytes else None
        # tensor parallel (mad.shard_serve): a generator that also hands each step to the other members; it
        # may ask the engine to wake every `wake_every` seconds while idle, and to `close` it as it stops
        self._make_generator = make_generator or BatchGenerator
        self.generator = self._make_generator(model, prompt_cache=self.cache, max_batch=max_batch)
        self.eos = tuple(getattr(tokenizer, "eos_token_ids", ()))
        self._device = mx.default_device()  # the device the command chose, for the engine's thread
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: deque[Job] = deque()
        self._choices: dict[int, _Choice] = {}
        self._jobs: dict[int, list[int]] = {}  # id(job) -> uids still running
        self._thread = threading.Thread(target=self._run, name="mad-engine", daemon=True)

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._inbox.put(("stop", None))
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self._inbox.put(("add", job))

    def cancel(self, job: Job) -> None:
        self._inbox.put(("cancel", job))

    @property
    def active(self) -> int:
        """Jobs admitted or waiting (a test of "nothing leaks" reads 0 once every client is gone)."""
        return len(self._jobs) + len(self._pending)

    def _run(self) -> None:
        import mlx.core as mx

        mx.set_default_device(self._device)
        if self._device == mx.gpu:
            from mad.kernels.linear_device import MAX_INVARIANT_ROWS, batch_invariant

            batch_invariant(min(self.max_batch, MAX_INVARIANT_ROWS))
        _forget_traces(self.model)  # traced before with another kernel choice, or by another thread
        try:
            self._loop()
        finally:
            close = getattr(self.generator, "close", None)  # tensor parallel: release the other members
            if close is not None:
                close()
            # MLX aborts the process at exit ("terminate called without an active exception") when a
            # compiled function traced by a thread that has ended is still alive: finish the work in
            # flight and drop this thread's traces before it ends
            mx.synchronize()
            _forget_traces(self.model)

    def _loop(self) -> None:
        while True:
            busy = self.generator.busy
            try:
                command, job = self._inbox.get(block=not busy and not self._pending,
                                               timeout=getattr(self.generator, "wake_every", None))
            except queue.Empty:
                command = None
            while command is not None:
                if command == "stop":
                    return
                self._pending.append(job) if command == "add" else self._cancel(job)
                try:
                    command, job = self._inbox.get_nowait()
                except queue.Empty:
                    command = None
            try:
                self._admit()
                if self.generator.busy:
                    for r in self.generator.step():
                        self._token(r)
            except Exception as e:  # noqa: BLE001 - a device error fails the running requests, not the server
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")

    def _admit(self) -> None:
        while self._pending:
            job = self._pending[0]
            rows = len(job.prompts) * len(job.params)
            used = sum(len(u) for u in self._jobs.values())
            if used and used + rows > self.max_batch:
                return
            self._pending.popleft()
            job.cached_tokens = [0] * len(job.prompts)
            try:
                for p, ids in enumerate(job.prompts):
                    uids = self.generator.insert(ids, job.params, job.max_tokens, self.eos, cuts=job.cuts)
                    for i, uid in enumerate(uids):
                        self._choices[uid] = _Choice(job, p * len(job.params) + i, StreamingDetokenizer(self.tokenizer))
                    job.uids.extend(uids)
            except MadError as e:  # checked when the request was parsed; kept as a last guard
                for uid in job.uids:
                    self.generator.remove(uid)
                    self._choices.pop(uid, None)
                job.emit(("error", str(e)))
                continue
            self._jobs[id(job)] = list(job.uids)

    def _cancel(self, job: Job) -> None:
        if job in self._pending:
            self._pending.remove(job)
        for uid in self._jobs.pop(id(job), []):
            self.generator.remove(uid)
            self._choices.pop(uid, None)

    def _fail_all(self, message: str) -> None:
        jobs = {id(c.job): c.job for c in self._choices.values()}
        for job in jobs.values():
            self._cancel(job)
            job.emit(("error", message))
        self.generator = self._make_generator(self.model, prompt_cache=self.cache, max_batch=self.max_batch)

    def _token(self, r: BatchResult) -> None:
        choice = self._choices.get(r.uid)
        if choice is None:
            return
        job, tok = choice.job, self.tokenizer
        choice.tokens += 1
        job.cached_tokens[choice.index // len(job.params)] = r.cached_tokens
        entry = None
        if r.logprob is not None:
            entry = (tok.decode([r.token]), r.logprob, [(tok.decode([t]), lp) for t, lp in r.top_logprobs or []])
        finish = r.finish_reason
        if finish != "stop":  # an eos token ends the text and is not part of it
            choice.detok.add(r.token)
        choice.text += choice.detok.flush() if finish else choice.detok.pop()
        out, hit = _cut_at_stop(choice.text, job.stops, final=finish is not None)
        choice.text = choice.text[len(out):]
        job.emit(("token", choice.index, out, entry))
        if hit:
            finish = "stop"
            self.generator.remove(r.uid)
        if finish:
            job.emit(("done", choice.index, finish, choice.tokens))
            self._choices.pop(r.uid, None)
            left = self._jobs.get(id(job))
            if left is not None:
                left.remove(r.uid)
                if not left:
                    del self._jobs[id(job)]


def _forget_traces(model: Any) -> None:
    """Drop the model's compiled functions (the next call traces anew, in the calling thread)."""
    program = getattr(model, "program", None)
    if program is not None:
        program.clear_compiled()


def _cut_at_stop(text: str, stops: list[str], final: bool) -> tuple[str, bool]:
    """(the part of `text` that can be handed out, whether a stop string was found): up to the first stop
    string; else all but an end that may begin one (all of it when `final`)."""
    if not stops:
        return text, False
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    if found:
        return text[:min(found)], True
    if final:
        return text, False
    hold = max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - hold], False


# ----------------------------------------------------------------------------------------------- the app
@dataclass
class ServerConfig:
    """What a request leaves out, and the server's bounds."""

    model_name: str
    max_tokens: int = 512
    temp: float = 0.0
    top_p: float = 1.0
    max_body_bytes: int = MAX_BODY_BYTES


def create_app(model: Any, tokenizer: Any, config: ServerConfig, chat_template: Optional[ChatTemplate] = None,
               engine: Optional[Engine] = None):
    """The Starlette application; `app.state.engine` is the running engine (stopped at shutdown)."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    template = chat_template or ChatTemplate()
    engine = engine or Engine(model, tokenizer)
    created = int(time.time())

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def read_json(request: Request) -> dict:
        """The body as a JSON object, read up to the limit. Past it the rest is read and dropped (up to
        `DRAIN_FACTOR` times the limit), so that a client that sends the whole body before reading gets
        the 413 rather than a reset connection; memory stays bounded by the limit either way."""
        limit = config.max_body_bytes
        length = request.headers.get("content-length", "")
        too_large = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        if length.isdigit() and int(length) > DRAIN_FACTOR * limit:
            raise too_large
        body, seen = bytearray(), 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > DRAIN_FACTOR * limit:
                break
            if seen <= limit:
                body += chunk
        if seen > limit:
            raise too_large
        try:
            data = json.loads(body)
        except ValueError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
        return data

    def check_model(name: Optional[str]) -> None:
        if name is not None and name != config.model_name:
            raise ApiError(404, f"The model '{printable(name)[:200]}' does not exist (this server serves "
                                f"'{config.model_name}')", "model", "model_not_found")

    def encode(text: str, param: str) -> list[int]:
        ids = [int(t) for t in tokenizer.encode(text)]
        if not ids:
            raise ApiError(400, f"{param}: the prompt is empty", param)
        return ids

    def check_ids(ids: list[int], param: str) -> list[int]:
        bad = [t for t in ids if not 0 <= t < model.vocab_size]
        if bad:
            raise ApiError(400, f"{param}: token id {bad[0]} is outside the vocabulary (0..{model.vocab_size - 1})",
                           param)
        return ids

    def sampling(req: _Request, logprobs: Optional[int]) -> list[SamplingParams]:
        temp = config.temp if req.temperature is None else req.temperature
        top_p = config.top_p if req.top_p is None else req.top_p
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        return [SamplingParams(temp, top_p, req.top_k, req.min_p, (seed + i) % 2**64, logprobs)
                for i in range(req.n)]

    def cuts_for(messages: list[dict], ids: list[int]) -> tuple[int, ...]:
        """The end of the system part, when the template renders it as a prefix of the prompt's ids: the
        prompt's reading is cut there and the cache keeps the state, so the next question after the same
        system part reads only itself (mad.prompt_cache)."""
        if len(messages) < 2 or messages[0]["role"] not in ("system", "developer"):
            return ()
        try:
            head = [int(t) for t in tokenizer.encode(template.render(messages[:1], add_generation_prompt=False))]
        except TemplateError:  # a template that wants more than a system message: no cut
            return ()
        return (len(head),) if head and ids[:len(head)] == head else ()

    async def parse(request: Request, kind: type) -> Any:
        data = await read_json(request)
        try:
            req = kind.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None
        check_model(req.model)
        return req

    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        prompts = req.prompt if isinstance(req.prompt, list) and not isinstance(req.prompt[0], int) else [req.prompt]
        ids = [check_ids(list(p), "prompt") if isinstance(p, list) else encode(p, "prompt") for p in prompts]
        if len(ids) * req.n > MAX_CHOICES:
            raise ApiError(400, f"n times the number of prompts is {len(ids) * req.n}; at most {MAX_CHOICES}", "n")
        return await run_job(request, req, ids, sampling(req, req.logprobs), (), chat=False)

    async def chat_completions(request: Request):
        req = await parse(request, ChatRequest)
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages]
        try:
            text = template.render(messages)
        except TemplateError as e:
            raise ApiError(400, e.diagnostics[0].message, "messages") from None
        ids = encode(text, "messages")
        if req.max_completion_tokens is not None:
            req.max_tokens = req.max_completion_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return await run_job(request, req, [ids], sampling(req, logprobs), cuts_for(messages, ids), chat=True)

    async def run_job(request: Request, req: _Request, prompts: list[list[int]], params: list[SamplingParams],
                      cuts: tuple, chat: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: tuple) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed: the server is shutting down
                pass

        job = Job(prompts, params, req.max_tokens or config.max_tokens, req.stops(), emit, cuts)
        engine.submit(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        n_choices = len(prompts) * len(params)
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(job, events, rid, n_choices, len(prompts), chat, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts = [""] * n_choices
        logs: list[list] = [[] for _ in range(n_choices)]
        reasons: list[Optional[str]] = [None] * n_choices
        completion_tokens = 0
        try:
            while any(r is None for r in reasons):
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        engine.cancel(job)
                        return JSONResponse({}, status_code=499)
                    continue
                if event[0] == "error":
                    raise ApiError(500, event[1], kind="server_error")
                if event[0] == "token":
                    texts[event[1]] += event[2]
                    if event[3] is not None:
                        logs[event[1]].append(event[3])
                else:
                    reasons[event[1]] = event[2]
                    completion_tokens += event[3]
        except BaseException:
            engine.cancel(job)
            raise
        choices = []
        for i in range(n_choices):
            lp = _logprobs(logs[i], chat) if params[0].logprobs is not None else None
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": lp,
                                "finish_reason": reasons[i]})
            else:
                choices.append({"index": i, "text": texts[i], "logprobs": lp, "finish_reason": reasons[i]})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": config.model_name, "choices": choices,
                             "usage": _usage(job, completion_tokens)})

    async def stream(job: Job, events: asyncio.Queue, rid: str, n_choices: int, n_prompts: int, chat: bool,
                     include_usage: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())
        want_logprobs = job.params[0].logprobs is not None

        def chunk(choices: list, **extra: Any) -> str:
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": config.model_name,
                                          "choices": choices, **extra}) + "\n\n"

        done, completion_tokens, offsets = 0, 0, [0] * n_choices
        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(n_choices)])
            while done < n_choices:
                event = await events.get()
                if event[0] == "error":
                    yield "data: " + json.dumps(ApiError(500, event[1], kind="server_error").body()) + "\n\n"
                    break
                if event[0] == "token":
                    _, i, text, entry = event
                    if not text and entry is None:
                        continue
                    lp = _logprobs([entry], chat, offsets[i]) if want_logprobs and entry is not None else None
                    offsets[i] += len(text)
                    body = {"delta": {"content": text}} if chat else {"text": text}
                    yield chunk([{"index": i, **body, "logprobs": lp, "finish_reason": None}])
                else:
                    _, i, reason, tokens = event
                    done += 1
                    completion_tokens += tokens
                    body = {"delta": {}} if chat else {"text": ""}
                    yield chunk([{"index": i, **body, "logprobs": None, "finish_reason": reason}])
            if include_usage:
                yield chunk([], usage=_usage(job, completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            if done < n_choices:  # the client left (or the server stops): free the rows
                engine.cancel(job)

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": config.model_name, "object": "model",
                                                         "created": created, "owned_by": "mad"}]})

    async def health(request: Request):
        gen, alive = engine.generator, engine._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped", "model": config.model_name,
                             "running": gen.running, "waiting": gen.waiting + len(engine._pending)},
                            status_code=200 if alive else 503)

    async def api_error(request: Request, exc: ApiError):
        return error_response(exc)

    async def http_error(request: Request, exc: HTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return error_response(ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None))

    async def server_error(request: Request, exc: Exception):
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error"))

    @asynccontextmanager
    async def lifespan(app):
        if not engine._thread.is_alive():
            engine.start()
        yield
        engine.stop()

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                            Route("/v1/models", models, methods=["GET"]),
                            Route("/health", health, methods=["GET"])],
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error},
                    lifespan=lifespan)
    app.state.engine = engine
    return app


def _usage(job: Job, completion_tokens: int) -> dict:
    prompt_tokens = sum(len(p) for p in job.prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(job.cached_tokens)}}


def _logprobs(entries: list, chat: bool, offset: int = 0) -> dict:
    """OpenAI's logprobs object from (token text, logprob, [(text, logprob)]) entries."""
    if chat:
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")),
                             "top_logprobs": [{"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}
                                              for s, v in top]} for t, lp, top in entries]}
    offsets, pos = [], offset
    for t, _, _ in entries:
        offsets.append(pos)
        pos += len(t)
    tops = []
    for _, _, top in entries:  # a dict by text: of two tokens with one text (a partial character) the likelier
        tops.append({})
        for text, value in top:
            tops[-1].setdefault(text, value)
    return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": tops, "text_offset": offsets}


def _require_stack() -> None:
    try:
        import jinja2  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise MadError(f"mad serve needs the 'serve' extra ({e.name} is missing): pip install 'mad-mlx[serve]'") from None


def check_server_args(host: str, port: int, max_batch: int, max_tokens: int, prompt_cache_bytes: int,
                      max_body_bytes: int, temp: float, top_p: float) -> None:
    """The flags of `mad serve`, before the model is loaded: a MadError naming the first bad one."""
    from .sampling import check_sampling

    _require_stack()
    if not host:
        raise MadError("--host must not be empty")
    if not 0 <= port <= 65535:
        raise MadError(f"--port must be in 0..65535, got {port}")
    for flag, value in (("--max-batch", max_batch), ("--max-tokens", max_tokens), ("--max-body-bytes", max_body_bytes)):
        if value < 1:
            raise MadError(f"{flag} must be at least 1, got {value}")
    if prompt_cache_bytes < 0:
        raise MadError(f"--prompt-cache-bytes must be at least 0 (0: no cache), got {prompt_cache_bytes}")
    check_sampling({"temp": "--temp", "top_p": "--top-p"}, temp=temp, top_p=top_p)
    if not math.isfinite(temp):
        raise MadError(f"--temp must be finite, got {temp}")


def serve(model: Any, tokenizer: Any, *, model_name: str, folder: Optional[Path] = None, host: str = "127.0.0.1",
          port: int = 8080, max_batch: int = 32, max_tokens: int = 512, temp: float = 0.0, top_p: float = 1.0,
          prompt_cache_bytes: int = DEFAULT_BYTES, max_body_bytes: int = MAX_BODY_BYTES,
          log_level: str = "info", make_generator: Optional[Callable[..., Any]] = None) -> None:
    """Serve a loaded model until interrupted (the `mad serve` command; flags checked by `check_server_args`).
    `make_generator`: the engine's generator (tensor parallel: `mad.shard_serve`)."""
    import uvicorn

    template = load_chat_template(folder)
    config = ServerConfig(model_name, max_tokens, temp, top_p, max_body_bytes)
    engine = Engine(model, tokenizer, max_batch, prompt_cache_bytes, make_generator)
    app = create_app(model, tokenizer, config, template, engine)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


__all__ = ["ApiError", "ChatRequest", "ChatTemplate", "CompletionRequest", "DEFAULT_TEMPLATE", "Engine", "Job",
           "ServerConfig", "check_server_args", "create_app", "load_chat_template", "serve"]
