"""Chat templates: the Tülu template, Qwen 2.5's ChatML template, and rendering a conversation to text.

A template is a jinja string usable as a transformers `chat_template`. Callers name one with `template=`:
"tulu" (the recipe's template), "qwen2.5" (Qwen 2.5's own ChatML template), "native" (whatever template the
tokenizer ships), a path to a Jinja file, or a jinja string of their own. `training_chat_template` adds the
BOS option of the recipe's OLMo 2 models.
"""

from __future__ import annotations

import functools
import importlib.resources
import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tulu_jax.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# open-instruct's CHAT_TEMPLATES["tulu"] (docs/recipe.md, SFT): no BOS; `<|system|>\n{c}\n`, `<|user|>\n{c}\n`,
# `<|assistant|>\n{c}{eos}\n`, except that the LAST assistant turn has no trailing "\n" (so that rendering a prefix of
# the conversation ends exactly at that turn's EOS); generation prompt `<|assistant|>\n`. The generation prompt sits
# inside the loop as in open-instruct, so an empty conversation renders as "". Unknown roles fail instead of vanishing.
TULU_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token }}"
    "{% if not loop.last %}{{ '\n' }}{% endif %}"
    "{% else %}"
    "{{ raise_exception('the tulu chat template has no role ' + message['role']) }}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}"
)

TULU_GENERATION_PROMPT = "<|assistant|>\n"

NAMED_TEMPLATES = ("tulu", "qwen2.5", "native")


@functools.cache
def qwen25_chat_template() -> str:
    """Qwen 2.5's ChatML chat template, verbatim from Qwen2.5-*-Instruct's tokenizer_config.json (shipped asset)."""
    return (importlib.resources.files("tulu_jax") / "assets" / "qwen2_5_chat_template.jinja").read_text("utf-8")


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase, template: str) -> str:
    """The jinja source for `template`: "tulu", "qwen2.5", "native" (the tokenizer's own), a jinja string, or the
    path of a Jinja file (read as UTF-8)."""
    if template == "tulu":
        if not getattr(tokenizer, "eos_token", None):
            raise ConfigError("the tulu chat template ends assistant turns with eos_token, but the tokenizer has none")
        return TULU_CHAT_TEMPLATE
    if template == "qwen2.5":
        return qwen25_chat_template()
    if template == "native":
        native = getattr(tokenizer, "chat_template", None)
        if not isinstance(native, str) or not native:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ConfigError(
                f"template='native' but the tokenizer {name} has no chat_template; use template='tulu' or give one"
            )
        return native
    if is_inline_jinja(template):
        return template
    if pathlib.Path(template).expanduser().is_file():
        return pathlib.Path(template).expanduser().read_text("utf-8")
    raise ConfigError(
        f"unknown chat template {template!r}: expected one of {NAMED_TEMPLATES}, a path to a Jinja file (none "
        "there) or a jinja string"
    )


def is_inline_jinja(template: str) -> bool:
    """Whether a template spec is jinja source itself (rather than a name or a file path)."""
    return "{{" in template or "{%" in template


def training_chat_template(tokenizer: PreTrainedTokenizerBase, template: str, *, add_bos: bool = False) -> str:
    """The jinja source a run trains (and exports) with: `template` resolved (see `resolve_chat_template`), with
    `{{ bos_token }}` in front when `add_bos` (open-instruct's `--add_bos`, used for the OLMo 2 Tülu models, whose
    tokenizer adds no BOS itself; our text is tokenized without special tokens, so the template must write it)."""
    source = resolve_chat_template(tokenizer, template)
    if not add_bos:
        return source
    if not getattr(tokenizer, "bos_token", None):
        raise ConfigError("tokenizer.add_bos is set but the tokenizer has no bos_token")
    if "bos_token" in source:
        raise ConfigError("tokenizer.add_bos is set but the chat template already writes bos_token (it would be doubled)")
    return "{{ bos_token }}" + source


def apply_chat_template(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str = "tulu",
    add_generation_prompt: bool = False,
) -> str:
    """Renders `messages` to text with `template` (see `resolve_chat_template`); the tokenizer supplies eos_token etc.

    The text is meant to be tokenized with `add_special_tokens=False`: any BOS is the template's business.
    A template the Jinja sandbox blocks (or that does not parse) is a ConfigError.
    """
    from jinja2.exceptions import SecurityError, TemplateSyntaxError

    source = resolve_chat_template(tokenizer, template)
    try:
        rendered = tokenizer.apply_chat_template(
            [dict(m) for m in messages], chat_template=source, tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except (SecurityError, TemplateSyntaxError) as e:  # the template itself is unusable, whatever the row
        name = "given as a jinja string" if is_inline_jinja(template) else template
        what = "is blocked by the Jinja sandbox" if isinstance(e, SecurityError) else "is not valid Jinja"
        raise ConfigError(f"chat template {name} {what}: {e}") from None
    if not isinstance(rendered, str):  # a batch of conversations or a tokenized result: not what we asked for
        raise TypeError(f"apply_chat_template returned {type(rendered).__name__}, expected str")
    return rendered
