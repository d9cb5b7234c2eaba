"""The remote engine: an LMDeploy ``api_server`` (or LMDeploy's ``proxy`` in front of several).

The model runs in another process or on other machines (``lmdeploy serve api_server <dir>
--tp 2`` for a model split over two GPUs, or several servers behind ``lmdeploy serve proxy``);
this engine speaks the OpenAI-compatible ``POST /v1/chat/completions`` with ``stream: true``
and reads the server-sent events (``data: {...}`` lines, ``data: [DONE]`` last).

Closing the stream closes the HTTP response; LMDeploy notices the disconnect and aborts the
session, which frees its slot. ``httpx`` comes with gradio, so nothing new is needed.

Prompts: by default the messages go as openai messages and the SERVER renders the chat
template (user text is already marker-neutralised by ``conversation.build_messages``).
With a tokenizer and ``send_token_ids=True`` the prompt goes as ``input_ids`` rendered by
``chat_template.render_ids`` instead, exactly as the in-process engines do it.

Token counting: the server renders the template, so ``count_tokens`` estimates locally. With
a tokenizer it is exact (``chat_template.render_ids``); without one it is a conservative
upper bound: one token per CJK character, one per 3 other characters, plus 5 per message for
the role markers (InternLM2's tokenizer needs about 0.7 tokens per Chinese character).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import httpx

from legal_eagle.engines.base import Chunk, EngineInfo, FinishReason, Message, SamplingParams
from legal_eagle.errors import EngineError

log = logging.getLogger(__name__)

MSG_CONNECT = "无法连接到模型服务（{url}）。请确认 LMDeploy api_server 已启动、地址和端口正确。"
MSG_TIMEOUT = "模型服务长时间没有响应，本次回答已中止，请稍后重试。"
MSG_AUTH = "模型服务拒绝了访问：API 密钥缺失或错误。请检查 API key 设置。"
MSG_NOT_FOUND = "模型服务上找不到所请求的模型或接口，请检查模型名称和服务地址。"
MSG_TOO_LONG = "问题和对话历史太长，超出了模型的上下文长度。请清空对话或缩短问题后重试。"
MSG_BUSY = "模型服务繁忙或暂时不可用，请稍后重试。"
MSG_BAD_REQUEST = "模型服务不接受这次请求（{detail}）。"
MSG_SERVER = "模型服务内部出错，请稍后重试。"
MSG_PROTOCOL = "模型服务返回了无法识别的数据，请检查服务地址是否指向 LMDeploy api_server。"
MSG_NO_MODEL = "模型服务上没有可用的模型（/v1/models 为空）。"
MSG_CLOSED = "远程推理引擎已关闭，请重启应用。"
MSG_DROPPED = "与模型服务的连接中断了，本次回答不完整，请重试。"

DEFAULT_STOP = ("<|im_end|>",)  # InternLM2 ends a turn with it; LMDeploy maps single-token stop words to ids
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort", "error": "error",
                                    "tool_calls": "stop"}


def estimate_tokens(messages: Sequence[Message]) -> int:
    """Conservative prompt size without a tokenizer: 1 per CJK char, 1 per 3 others, 5 per message."""
    total = 3  # BOS and the generation prompt
    for message in messages:
        text = message["content"]
        cjk = sum(1 for c in text if _is_cjk(c))
        total += cjk + -(-(len(text) - cjk) // 3) + 5
    return total


def _is_cjk(char: str) -> bool:
    """True for CJK ideographs, kana, hangul and full-width punctuation."""
    code = ord(char)
    return (0x2E80 <= code <= 0x9FFF or 0xAC00 <= code <= 0xD7AF or 0xF900 <= code <= 0xFAFF
            or 0xFF00 <= code <= 0xFFEF or 0x20000 <= code <= 0x2FA1F)


def request_body(model: str, messages: Sequence[Message], params: SamplingParams, *,
                 stop: Sequence[str] = DEFAULT_STOP, input_ids: list[int] | None = None) -> dict[str, Any]:
    """The JSON body of one streamed ``/v1/chat/completions`` request (LMDeploy 0.18 fields).

    Greedy (or temperature 0) is sent as LMDeploy decodes greedily in-process: ``top_k=1``
    with temperature 1.0 and no repetition penalty (the server always samples, and ``top_k=1``
    makes sampling pick the most likely token). ``seed`` is sent only when sampling.

    Args:
        model: the served model name (from ``/v1/models``).
        messages: openai-style messages (user text already marker-neutralised).
        params: validated sampling settings.
        stop: stop words; each must be one token in the served tokenizer.
        input_ids: send these prompt ids instead of the messages (``messages`` is then empty).

    Returns:
        The request body as a dict.
    """
    sample = not params.greedy and params.temperature > 0
    body: dict[str, Any] = {
        "model": model,
        "messages": [] if input_ids is not None else [{"role": m["role"], "content": m["content"]}
                                                      for m in messages],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": params.max_new_tokens,
        "return_token_ids": True,  # each chunk carries its token ids: exact n_tokens while streaming
        "skip_special_tokens": True,
    }
    if input_ids is not None:
        body["input_ids"] = list(input_ids)
    if stop:
        body["stop"] = list(stop)
    if sample:
        body.update(temperature=params.temperature, top_p=params.top_p,
                    repetition_penalty=params.repetition_penalty)
        if params.seed is not None:
            body["seed"] = params.seed
    else:
        body.update(temperature=1.0, top_k=1, repetition_penalty=1.0)
    return body


def http_error(status: int, body: str, url: str = "") -> EngineError:
    """An HTTP error answer (status and body text) as an ``EngineError`` with a Chinese message."""
    detail = _error_message(body) or body[:200]
    lowered = detail.lower()
    if "context length" in lowered or "context_length" in lowered or "too long" in lowered:
        message = MSG_TOO_LONG
    elif status in (401, 403):
        message = MSG_AUTH
    elif status == 404:
        message = MSG_NOT_FOUND
    elif status in (429, 503):
        message = MSG_BUSY
    elif 400 <= status < 500:
        message = MSG_BAD_REQUEST.format(detail=detail[:120])
    else:
        message = MSG_SERVER
    return EngineError(message, f"remote engine {url}: HTTP {status}: {detail}")


def _error_message(body: str) -> str:
    """The message of an OpenAI/LMDeploy error body, or '' when it is not one."""
    try:
        data = json.loads(body)
    except (ValueError, TypeError):
        return ""
    if not isinstance(data, dict):
        return ""
    error = data.get("error", data)
    if isinstance(error, dict):
        for key in ("message", "text", "detail"):
            if isinstance(error.get(key), str):
                return str(error[key])
        if isinstance(error.get("detail"), dict):
            return json.dumps(error["detail"], ensure_ascii=False)
    return error if isinstance(error, str) else ""


class RemoteEngine:
    """An ``Engine`` backed by an LMDeploy ``api_server`` or ``proxy`` over HTTP.

    Build it with ``RemoteEngine.connect`` (asks the server for its model name) or directly.
    Thread-safe: one pooled ``httpx.Client`` serves every concurrent stream.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, tokenizer: Any | None = None,
                 send_token_ids: bool = False, context_len: int = 8192, stop: Sequence[str] = DEFAULT_STOP,
                 connect_timeout_s: float = 5.0, read_timeout_s: float = 120.0, max_connections: int = 128,
                 name: str | None = None, model_format: str = "awq", quantization: str = "AWQ W4A16 (server)",
                 extra_body: Mapping[str, Any] | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        """Create the engine.

        Args:
            base_url: server root, e.g. ``http://127.0.0.1:23333`` (a trailing ``/v1`` is accepted).
            model: served model name, as ``/v1/models`` lists it.
            api_key: sent as ``Authorization: Bearer <key>`` (``lmdeploy serve ... --api-keys``).
            tokenizer: Hugging Face tokenizer of the served model: exact ``count_tokens``.
            send_token_ids: send prompts as ``input_ids`` from ``chat_template.render_ids``
                (needs ``tokenizer``) instead of messages rendered by the server.
            context_len: the server's ``--session-len``, reported in ``info``.
            stop: stop words (single tokens of the served tokenizer).
            connect_timeout_s: how long to wait for a connection.
            read_timeout_s: longest silence between two streamed events before giving up.
            max_connections: pool size; at least the app's concurrency limit.
            name: display name (default: the model name).
            model_format, quantization: what the server loaded (``--model-format``), for ``info``.
            extra_body: more request fields, sent with every request and winning over ours
                (e.g. ``{"ignore_eos": True}`` for load tests, ``{"min_p": 0.05}``).
            transport: an ``httpx`` transport (tests pass ``httpx.MockTransport``).
        """
        if send_token_ids and tokenizer is None:
            raise ValueError("send_token_ids=True needs a tokenizer")
        if context_len < 1:
            raise ValueError(f"context_len must be at least 1, got {context_len}")
        self.base_url = normalise_base_url(base_url)
        self.model = model
        self._tokenizer = tokenizer
        self._send_ids = send_token_ids
        self._stop = tuple(stop)
        self._context_len = context_len
        self._name = name or model
        self._extra = dict(extra_body or {})
        self._format, self._quantization = model_format, quantization
        self._client = _make_client(self.base_url, api_key, connect_timeout_s, read_timeout_s,
                                    max_connections, transport)
        self._lock = threading.Lock()
        self._active = 0
        self._closed = False

    @classmethod
    def connect(cls, base_url: str, *, model: str | None = None, api_key: str | None = None,
                tokenizer_dir: str | None = None, wait_s: float = 0.0, retry_s: float = 2.0,
                on_wait: Callable[[str], None] | None = None, transport: httpx.BaseTransport | None = None,
                **kwargs: Any) -> RemoteEngine:
        """Check the server, find its model name if not given, and load a tokenizer if asked.

        Args:
            base_url: server root.
            model: served model name; None asks ``GET /v1/models`` and takes the first.
            api_key: bearer token, if the server was started with ``--api-keys``.
            tokenizer_dir: local folder with the served model's tokenizer (exact token counts).
            wait_s: keep retrying this long while the server is unreachable or lists no model yet
                (an api_server answers only once its model is loaded; a proxy lists none until
                an api_server registers). Auth and protocol errors fail at once.
            retry_s: pause between tries.
            on_wait: called with the reason before each pause (e.g. to report progress).
            transport: an ``httpx`` transport for tests.
            **kwargs: more ``RemoteEngine`` arguments.

        Returns:
            The engine, after one successful ``/v1/models`` call.

        Raises:
            EngineError: the server cannot be reached, refuses the key, or serves no model.
        """
        url = normalise_base_url(base_url)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                models = list_models(url, api_key=api_key, transport=transport,
                                     timeout_s=kwargs.get("connect_timeout_s", 5.0))
                if model is None and not models:
                    raise EngineError(MSG_NO_MODEL, f"{url}/v1/models lists no model")
                break
            except EngineError as exc:
                retryable = isinstance(exc.__cause__, httpx.TransportError) or exc.user_message == MSG_NO_MODEL
                if not retryable or time.monotonic() + retry_s > deadline:
                    raise
                if on_wait is not None:
                    on_wait(str(exc))
                log.info("waiting for the model server: %s", exc)
                time.sleep(retry_s)
        if model is None:
            model = models[0]
        elif models and model not in models:
            log.warning("model %r is not among the served models %s (LMDeploy treats it as an adapter name)",
                        model, models)
        tokenizer = None
        if tokenizer_dir:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        log.info("remote engine: %s serves %s", url, model)
        return cls(url, model, api_key=api_key, tokenizer=tokenizer, transport=transport, **kwargs)

    @property
    def info(self) -> EngineInfo:
        """Describes the remote model (format and quantization as given: the server does not say)."""
        return EngineInfo(name=self._name, backend="remote", model_path=f"{self.base_url} ({self.model})",
                          model_format=self._format, quantization=self._quantization,
                          context_len=self._context_len,
                          extra={"url": self.base_url, "model": self.model,
                                 "prompt": "token ids" if self._send_ids else "messages"})

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Exact with a tokenizer, else the conservative ``estimate_tokens``."""
        if self._tokenizer is not None:
            from legal_eagle.chat_template import render_ids

            return len(render_ids(self._tokenizer, messages))
        return estimate_tokens(messages)

    def stream(self, messages: Sequence[Message], params: SamplingParams) -> Iterator[Chunk]:
        """Stream the answer from the server; closing the generator closes the HTTP response."""
        if self._closed:
            raise EngineError(MSG_CLOSED, "remote engine closed")
        ids = None
        if self._send_ids:
            from legal_eagle.chat_template import render_ids

            ids = render_ids(self._tokenizer, messages)
        body = request_body(self.model, messages, params, stop=self._stop, input_ids=ids) | self._extra
        return self._generate(body)

    def _generate(self, body: dict[str, Any]) -> Iterator[Chunk]:
        """The generator behind ``stream``: one HTTP response, closed in ``finally``."""
        with self._lock:
            self._active += 1
        n_tokens = 0
        received = False
        final: tuple[str, FinishReason] | None = None  # held back until the usage event or [DONE]
        try:
            with self._client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise http_error(response.status_code, response.text, self.base_url)
                for event in _sse_events(response.iter_lines()):
                    received = True
                    if event is None:  # [DONE]
                        break
                    text, step_tokens, reason, usage = _parse_event(event, self.base_url)
                    n_tokens = usage if usage is not None else n_tokens + step_tokens
                    if final is not None:
                        final = (final[0] + text, final[1])
                    elif reason is not None:
                        final = (text, reason)
                    elif text:
                        yield Chunk(text=text, n_tokens=n_tokens)
            if final is None:
                raise EngineError(MSG_SERVER, f"{self.base_url}: stream ended without a finish_reason")
            yield Chunk(text=final[0], n_tokens=n_tokens, finish_reason=final[1])
        except httpx.TimeoutException as exc:
            kind = "connect" if isinstance(exc, httpx.ConnectTimeout) else "read"
            raise EngineError(MSG_TIMEOUT if kind == "read" else MSG_CONNECT.format(url=self.base_url),
                              f"{self.base_url}: {kind} timeout: {exc}") from exc
        except httpx.TransportError as exc:
            message = MSG_DROPPED if received else MSG_CONNECT.format(url=self.base_url)
            raise EngineError(message, f"{self.base_url}: {type(exc).__name__}: {exc}") from exc
        finally:
            with self._lock:
                self._active -= 1

    def active_generations(self) -> int:
        """Streams open right now."""
        with self._lock:
            return self._active

    def gpu_memory_bytes(self) -> int | None:
        """The GPU memory is the server's: not visible from here."""
        return None

    def close(self) -> None:
        """Close the connection pool (open streams end with a connection error)."""
        self._closed = True
        self._client.close()


def normalise_base_url(url: str) -> str:
    """``http://host:port`` without a trailing slash or ``/v1``; ValueError for a non-HTTP URL."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"remote URL must start with http:// or https://, got {url!r}")
    return url[:-3] if url.endswith("/v1") else url


def list_models(base_url: str, *, api_key: str | None = None, transport: httpx.BaseTransport | None = None,
                timeout_s: float = 5.0) -> list[str]:
    """The model names ``GET /v1/models`` lists.

    Raises:
        EngineError: unreachable, refused, or not an OpenAI-style answer.
    """
    url = normalise_base_url(base_url)
    with _make_client(url, api_key, timeout_s, timeout_s, 1, transport) as client:
        try:
            response = client.get("/v1/models")
        except httpx.TransportError as exc:
            raise EngineError(MSG_CONNECT.format(url=url), f"{url}/v1/models: {type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        raise http_error(response.status_code, response.text, url)
    try:
        data = response.json()["data"]
        return [str(card["id"]) for card in data]
    except (ValueError, KeyError, TypeError) as exc:
        raise EngineError(MSG_PROTOCOL, f"{url}/v1/models answered {response.text[:200]!r}") from exc


def _make_client(base_url: str, api_key: str | None, connect_s: float, read_s: float, max_connections: int,
                 transport: httpx.BaseTransport | None) -> httpx.Client:
    """A pooled client; ``trust_env=False`` so a platform's HTTP_PROXY never sits between app and model."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=base_url, headers=headers, transport=transport, trust_env=False,
                        timeout=httpx.Timeout(connect=connect_s, read=read_s, write=30.0, pool=30.0),
                        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=16))


def _sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any] | None]:
    """Decoded ``data:`` payloads; None for ``[DONE]``. Blank lines and comments are skipped.

    A bare JSON line (LMDeploy's proxy reports a dead node that way) is passed through too.
    """
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith(":"):
            continue
        if line.startswith("data:"):
            payload = line[5:].strip()
        elif line.startswith("{"):
            payload = line
        else:  # "event:", "id:", "retry:" fields carry nothing we use
            continue
        if payload == "[DONE]":
            yield None
            return
        try:
            yield json.loads(payload)
        except ValueError as exc:
            raise EngineError(MSG_PROTOCOL, f"undecodable event {payload[:200]!r}") from exc


def _parse_event(event: dict[str, Any], url: str) -> tuple[str, int, FinishReason | None, int | None]:
    """One chunk event as (new text, its token count, finish reason, usage total or None)."""
    if "error" in event:  # api_server: data: {"error": {"message", "type", "code"}}
        error = event["error"]
        message = str(error.get("message", error)) if isinstance(error, dict) else str(error)
        code = error.get("code") if isinstance(error, dict) else None
        raise http_error(code if isinstance(code, int) else 500, json.dumps({"message": message}), url)
    if "error_code" in event:  # proxy: {"error_code": n, "text": "..."} (node timed out or none available)
        raise http_error(503, json.dumps({"message": str(event.get("text", ""))}), url)
    usage = event.get("usage")
    total = int(usage["completion_tokens"]) if isinstance(usage, dict) and "completion_tokens" in usage else None
    choices = event.get("choices") or []
    if not choices:
        return "", 0, None, total
    choice = choices[0]
    delta = choice.get("delta") or {}
    text = delta.get("content") or ""
    ids = choice.get("output_ids")
    step = len(ids) if isinstance(ids, list) else (1 if text else 0)
    reason = choice.get("finish_reason")
    mapped: FinishReason | None = None
    if reason is not None:
        mapped = _FINISH.get(str(reason), "error")
        if mapped == "error":
            raise EngineError(MSG_SERVER, f"{url}: generation ended with finish_reason={reason!r}")
    return text, step, mapped, total
