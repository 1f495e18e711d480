"""The OpenAI-compatible wire protocol with the standard library: ``GET {base_url}/models`` (the probe ``check``
makes), ``POST {base_url}/completions`` and ``POST {base_url}/chat/completions``.

Plain ``urllib`` rather than the ``openai`` client: the protocol is one JSON request and answer, and the retries,
back-off and error wording are ours to decide (one line for the user, the answer that was malformed named).  Torch-
free and effitrain-free apart from the error class, so ``effitrain check`` can probe an endpoint in milliseconds.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Optional

from effitrain.registry import ConfigError


class EndpointError(RuntimeError):
    """A request that failed in a way a retry may cure (no connection, a timeout, a 5xx, a 429, a malformed answer)."""


class EndpointRefused(RuntimeError):
    """A request the server refused for good (4xx other than 408/429): retrying would send the same thing again."""


def _request(url: str, key: Optional[str], body: Optional[dict], timeout: float) -> Any:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:200].decode("utf-8", "replace").strip().replace("\n", " ")
        if exc.code in (408, 429) or exc.code >= 500:
            raise EndpointError(f"HTTP {exc.code} from {url}: {detail}") from None
        raise EndpointRefused(f"HTTP {exc.code} from {url}: {detail}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise EndpointError(f"cannot reach {url}: {reason}") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise EndpointError(f"{url} answered with something that is not JSON: {raw[:80]!r}") from None


def probe_models(base_url: str, key: Optional[str], *, timeout: float, key_path: str) -> list[str]:
    """The model ids the endpoint serves; a ConfigError naming ``key_path`` when it does not answer."""
    url = base_url.rstrip("/") + "/models"
    try:
        answer = _request(url, key, None, timeout)
    except (EndpointError, EndpointRefused) as exc:
        raise ConfigError(f"{key_path}: the endpoint does not answer ({exc}); start the server or fix the URL "
                          f"(it should end in /v1)") from None
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list):
        raise ConfigError(f"{key_path}: {url} answered, but not with an OpenAI model list ({{'data': [...]}})")
    return [str(m.get("id")) for m in data if isinstance(m, dict)]


def complete(base_url: str, key: Optional[str], body: dict, *, timeout: float, n: int,
             chat: bool = False) -> list[tuple[str, int]]:
    """``POST /completions`` (``chat``: ``/chat/completions``) with ``body``; ``n`` (text, completion tokens) pairs
    in choice order.  A malformed answer (no choices, a choice without text, the wrong count) is an
    :class:`EndpointError`."""
    url = base_url.rstrip("/") + ("/chat/completions" if chat else "/completions")
    answer = _request(url, key, body, timeout)
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or len(choices) != n:
        raise EndpointError(f"{url} answered without {n} choice(s): {str(answer)[:120]}")
    ordered = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
    texts = []
    for choice in ordered:
        # a completion's choice holds its text; a chat completion's a message with the assistant's content
        message = choice.get("message") if isinstance(choice, dict) else None
        text = (message.get("content") if isinstance(message, dict) else None) if chat else \
            (choice.get("text") if isinstance(choice, dict) else None)
        if not isinstance(text, str):
            raise EndpointError(f"{url} answered with a choice that has no text: {str(choice)[:120]}")
        texts.append(text)
    usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
    total = usage.get("completion_tokens")
    # the usage block is optional in the protocol: without it, tokens are not counted (0), never guessed
    per = [int(total) // n if isinstance(total, int) else 0] * n
    return list(zip(texts, per))
