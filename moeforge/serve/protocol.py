"""OpenAI request bodies, error objects and the chat template.

Request bodies are validated with pydantic (strict integers and booleans: `"max_tokens": "5"` is
a type error, as in OpenAI's API); unknown fields are ignored. Every user error becomes an
`APIError` and is answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`
with a 4xx status.

Chat template: the checkpoint's `tokenizer_config.json` `chat_template` (Jinja, rendered with
`messages`, `add_generation_prompt=True`, `bos_token`, `eos_token`) when present; otherwise the
plain template documented in docs/serving.md: one line `role: content` per message, then
`assistant:`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: StrictInt | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=0)  # not in OpenAI's API; vLLM's extension
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    user: str | None = None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Common):
    prompt: str | list[str] | list[StrictInt]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """Bytes of a request body -> a validated request, or an APIError(400) that says what is wrong."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise APIError(400, f"invalid value for '{where}': {err['msg']}", param=where or None) from None


class ChatTemplate:
    """Renders messages into a prompt string."""

    def __init__(self, ckpt: Path | None = None):
        self.template, self.bos, self.eos = None, "", ""
        cfg_file = ckpt / "tokenizer_config.json" if ckpt else None
        if cfg_file is not None and cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            source = cfg.get("chat_template")
            if isinstance(source, list):  # HF allows a list of named templates
                source = next((t.get("template") for t in source if t.get("name") == "default"), None)
            if source:
                from jinja2.sandbox import ImmutableSandboxedEnvironment

                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                self.template = env.from_string(source)
                self.bos, self.eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))

    @property
    def kind(self) -> str:
        return "checkpoint" if self.template is not None else "plain"

    def render(self, messages: list[ChatMessage]) -> str:
        if self.template is None:
            return "".join(f"{m.role}: {m.text()}\n" for m in messages) + "assistant:"
        try:
            return self.template.render(messages=[{"role": m.role, "content": m.text()} for m in messages],
                                        add_generation_prompt=True, bos_token=self.bos, eos_token=self.eos)
        except Exception as e:  # noqa: BLE001 - a template may raise on message orders it does not accept
            raise APIError(400, f"the chat template rejected the messages: {e}") from None


def _token_text(tok: Any) -> str:
    if isinstance(tok, dict):
        return str(tok.get("content", ""))
    return tok or ""
