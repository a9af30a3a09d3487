"""Chat templates: a model's `chat_template` (Jinja) turns a list of messages into its prompt.

The template comes from the checkpoint's `tokenizer_config.json` (what `nitsum-ckpt
convert-hf` carries over from a Hugging Face folder) or from a file (`--chat-template FILE`).
It renders in `jinja2.sandbox.ImmutableSandboxedEnvironment` with the same environment
transformers builds (`trim_blocks`, `lstrip_blocks`, the `loopcontrols` extension, the
`tojson` filter and the `raise_exception` / `strftime_now` globals), so a template written
for transformers' `apply_chat_template` renders the same text here. A template is code from
the checkpoint: the sandbox keeps it from touching anything but the values it is given.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class ChatTemplateError(ValueError):
    """The model has no chat template, or its template failed for these messages."""


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' filter: unlike Jinja's own tojson it does not escape HTML characters.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to (`bos_token`, `eos_token`)."""

    def __init__(self, source: str, *, special_tokens: dict[str, str] | None = None, origin: str = "template"):
        self.source, self.origin = source, origin
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{origin}: chat template is not valid Jinja (line {e.lineno}: "
                                    f"{e.message})") from None

    @classmethod
    def from_tokenizer_config(cls, path: str | Path) -> "ChatTemplate | None":
        """The template of a `tokenizer_config.json` (its "default" one when it names several); None
        when the file has no `chat_template`."""
        template, special_tokens = _read_tokenizer_config(Path(path))
        return None if template is None else cls(template, special_tokens=special_tokens, origin=str(path))

    @classmethod
    def for_checkpoint(cls, checkpoint: str | Path | None, template_file: str | Path | None = None
                       ) -> "ChatTemplate | None":
        """`template_file` (`--chat-template FILE`, the Jinja source itself) if given, else the
        checkpoint's own template; either way with the checkpoint's special tokens. None when
        neither exists."""
        config = Path(checkpoint) / TOKENIZER_CONFIG_FILE if checkpoint is not None else None
        template, special_tokens = _read_tokenizer_config(config) if config and config.is_file() else (None, {})
        if template_file is not None:
            return cls(Path(template_file).read_text(), special_tokens=special_tokens, origin=str(template_file))
        return None if template is None else cls(template, special_tokens=special_tokens, origin=str(config))

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...])."""
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template ({self.origin}) refused these messages: {e}") from None


def _read_tokenizer_config(path: Path) -> tuple[str | None, dict[str, str]]:
    """(chat template or None, special tokens) of a tokenizer_config.json."""
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ChatTemplateError(f"{path}: not valid JSON ({e})") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}, ...]
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    if template is not None and not isinstance(template, str):
        raise ChatTemplateError(f"{path}: chat_template must be a string or a list of named templates with a "
                                f"'default', got {type(template).__name__}")
    tokens = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return template, {k: v for k, v in tokens.items() if v is not None}
