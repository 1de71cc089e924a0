"""A checkpoint's chat template, rendered as transformers' `apply_chat_template` renders it:
the Jinja template of its tokenizer_config.json (or chat_template.jinja) run in Jinja's
immutable sandbox (a template from the hub is untrusted code) with the same options, filters
and globals, and the tokenizer's special tokens as variables. Conversational rows
(TRL's lists of {"role", "content"} messages) become text here, then tokens.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from lora_jax.files import path, read_json

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")  # fmt: skip


def is_conversation(value: Any) -> bool:
    """A list of messages, each a mapping with a "role" (TRL's test for a conversational row)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, Mapping) and "role" in m for m in value)  # fmt: skip


def check_conversation(value: Any, field: str, at: str) -> None:
    """A ValueError starting with `at` unless `value` is a non-empty list of messages with a
    string role and string content."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{at}: {field} is not a list of messages: a conversational row's "
                         "prompt, chosen and rejected each are one.")  # fmt: skip
    for i, message in enumerate(value):
        if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):  # fmt: skip
            raise ValueError(f"{at}: {field}[{i}] is not a message with a string role and "
                             "content.")  # fmt: skip


def read_template(directory: Any) -> tuple[str | None, dict[str, str]]:
    """(the checkpoint's chat template or None, its special tokens as text) from
    chat_template.jinja or tokenizer_config.json in `directory`; a template listed by name
    is the one named "default"."""
    folder = path(directory)
    config_file = folder / "tokenizer_config.json"
    config = read_json(config_file) if config_file.is_file() else {}  # damaged: one line
    specials = {}
    for name in SPECIAL_TOKENS:
        token = config.get(name)
        token = token.get("content") if isinstance(token, Mapping) else token
        if isinstance(token, str):
            specials[name] = token
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    return (template if isinstance(template, str) else None), specials


def render(template: str, messages: Sequence[Mapping[str, Any]], specials: Mapping[str, str],
           add_generation_prompt: bool = False) -> str:  # fmt: skip
    """The text of `messages` by `template`, as transformers gives it (tokenize=False); a
    template that fails (its syntax, or its own raise_exception) is a ValueError."""
    import jinja2

    try:
        return _compiled(template).render(messages=[dict(m) for m in messages], tools=None,
                                          documents=None, **specials,
                                          add_generation_prompt=add_generation_prompt)  # fmt: skip
    except jinja2.TemplateError as err:
        raise ValueError(f"the chat template fails: {err}") from None


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    """The template compiled in transformers' environment: the immutable sandbox, blocks
    trimmed, loop controls, a JSON filter that leaves non-ASCII as it is, raise_exception
    and strftime_now; `{% generation %}` blocks (assistant-token tracking) render their
    body."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}  # noqa: RUF012 (jinja reads it from the class)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno
            )

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # fmt: skip
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)  # fmt: skip

    extensions = [Generation, jinja2.ext.loopcontrols]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=extensions)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)
