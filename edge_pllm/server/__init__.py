"""A local OpenAI-compatible server: the request's `user` field selects whose history
personalizes the answer.

    edge-pllm serve                     # 127.0.0.1:8400, no auth on loopback

- `POST /v1/chat/completions`, `POST /v1/completions` (streaming with SSE, or not); the
  strategy is chosen per request with the extension field `edge_pllm: {"strategy": ...}`,
  else the server default. `GET /v1/models` lists the loaded bundle.
- History: `POST/GET /v1/users/{user}/history`, `GET /v1/users/{user}/search?q=&k=`,
  `POST /v1/users/{user}/feedback`,
  `DELETE /v1/users/{user}/history/{id}`, `DELETE /v1/users/{user}`,
  `GET /v1/users/{user}/export` (JSON lines).
- Errors are OpenAI-style bodies mapped from typed exceptions (never from message text).
- llama.cpp contexts are not safe for concurrent use: generations are serialized by the
  runtime's lock and wait for it in generation threads of their own; nothing on the event
  loop touches the model, so history, search and `/v1/models` answer while it generates.
  `usage` and `finish_reason` are the generation's own; `stream_options.include_usage`
  adds OpenAI's usage chunk (no choices) before `[DONE]`.
- Bearer-token auth: optional on loopback, required on any other address.
- Every request is parsed by one schema (`schema.py`): strict types, bounded numbers, no
  unknown fields, and OpenAI fields this server does not implement (`n > 1`, `logprobs`,
  `tools`, `response_format` other than text, ...) refused with a 400 that names them.
  Bodies over `max_body_bytes` are refused with 413 while they are read (chunked ones
  too), a body that stalls for `read_timeout` seconds with 408, and a connection whose
  headers do not arrive within `read_timeout` is closed. No error is ever plain text.
- A user the store has never seen gets the plain prompt (`edge_pllm.fallback` says so).
- Memory is opt-in: `edge_pllm: {"remember": true}` on a request (or `serve --remember` for
  every request that does not say `false`) stores the user's last turn as a history item
  (kind "turn") once the answer is complete and its client still there, and keeps the
  answer under the response's `id` for `POST /v1/users/{user}/feedback`
  (`{"answer_id", "rating": 1 | -1}` or `{"answer_id", "edit": "..."}`). `edge_pllm.memory`
  says what was stored (in a stream's last chunk).

Each response carries `edge_pllm` with what personalized it (strategy, history item ids,
and a fingerprint of the soft tokens), so clients and tests can see what the runtime used.
"""

from __future__ import annotations

from .app import check_url, create_app
from .errors import HTTPError, error_body, status_of
from .run import listen, serve, uvicorn_config
from .service import Service
from .settings import DEFAULT_PORT, ServerConfig, is_loopback

__all__ = [
    "DEFAULT_PORT",
    "HTTPError",
    "ServerConfig",
    "Service",
    "check_url",
    "create_app",
    "error_body",
    "is_loopback",
    "listen",
    "serve",
    "status_of",
    "uvicorn_config",
]
