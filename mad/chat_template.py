"""Chat templates: a conversation (role/content messages) as the prompt text a model was trained on.

A checkpoint names its template as transformers does (`chat_template.jinja`, `chat_template.json`, or the
`chat_template` entry of `tokenizer_config.json`), and it renders as `apply_chat_template` renders it,
with the special tokens the config names (`bos_token`, ...). Jinja runs sandboxed: a template from a
checkpoint is data, never code. `mad serve` renders whole conversations; `mad chat` renders each new
message alone, since the recurrent state already holds the conversation before it (as mlx-lm's chat
renders each new message alone over its prompt cache).

Jinja2 comes with the `serve` extra; a model without a template needs none.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from .errors import MadError, Source

# `mad serve`'s template for a model without one: a "role: content" line per message
DEFAULT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant:{% endif %}")


class TemplateError(MadError):
    """The template refused or failed on the messages (the server answers 400 with this message)."""


class ChatTemplate:
    """A Jinja chat template, rendered as transformers' `apply_chat_template` renders it."""

    def __init__(self, source: str = DEFAULT_TEMPLATE, special: Optional[dict] = None, where: str = "chat template"):
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise MadError("the model has a chat template and rendering it needs Jinja2: "
                           "pip install 'mad-mlx[serve]'", Source(where)) from None

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise MadError(f"cannot read the chat template: {e}", Source(where)) from None
        self.source = source
        self.special = special or {}

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages`; a TemplateError when the template refuses them or fails."""
        import jinja2

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)
        except jinja2.exceptions.TemplateError as e:
            raise TemplateError(f"the chat template refused the messages: {e}") from None
        except Exception as e:  # noqa: BLE001 - a template's own bug (a missing key, a type error)
            raise TemplateError(f"the chat template failed on the messages: {type(e).__name__}: {e}") from None


def template_source(folder: Optional[Path]) -> tuple[Optional[str], dict, str]:
    """(template source or None, special tokens, where it was read) of a checkpoint folder:
    `chat_template.jinja`, `chat_template.json` or the `chat_template` of `tokenizer_config.json` (a
    name->template list: "default", else the first)."""
    if folder is None or not Path(folder).is_dir():
        return None, {}, ""
    folder = Path(folder)
    config: dict = {}
    file = folder / "tokenizer_config.json"
    if file.is_file():
        config = _json_file(file)
    special = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[key] = value
    source, where = config.get("chat_template"), str(file)
    if (folder / "chat_template.json").is_file():
        source, where = _json_file(folder / "chat_template.json").get("chat_template"), str(folder / "chat_template.json")
    if (folder / "chat_template.jinja").is_file():
        source, where = (folder / "chat_template.jinja").read_text(encoding="utf-8"), str(folder / "chat_template.jinja")
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default", next(iter(named.values()), None))
    if source is not None and not isinstance(source, str):
        raise MadError(f"'chat_template' must be a string or a list of {{name, template}}, got {type(source).__name__}",
                       Source(where))
    return source, special, where


def load_chat_template(folder: Optional[Path]) -> ChatTemplate:
    """The chat template of a checkpoint folder (`template_source`), or the plain default when it has none."""
    source, special, where = template_source(folder)
    return ChatTemplate(special=special) if source is None else ChatTemplate(source, special, where)


def _json_file(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MadError(f"cannot read {file.name}: {e}", Source(str(file))) from None
    if not isinstance(data, dict):
        raise MadError(f"{file.name}: expected a JSON object", Source(str(file)))
    return data
