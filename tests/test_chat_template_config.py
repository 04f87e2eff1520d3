"""The run's chat template from the config (names, a Jinja file, inline Jinja, add_bos) and its HF export."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tulu_jax.data.sft import IGNORE_INDEX, tokenize_sft
from tulu_jax.data.templates import TULU_CHAT_TEMPLATE, apply_chat_template
from tulu_jax.data.tokenizers import load_tokenizer, qwen25_tokenizer
from tulu_jax.errors import ConfigError
from tulu_jax.models.presets import preset_config
from tulu_jax.stages.run_dir import export_hf
from tulu_jax.stages.sections import ModelSection, OptimSection, TokenizerSection
from tulu_jax.stages.setup import (
    init_stage_state,
    load_stage_tokenizer,
    setup_mesh,
)

TINY_TOKENIZER = "tulu_jax/assets/tiny_tokenizer"
MODEL = ModelSection(preset="tiny")
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
]


@pytest.fixture(scope="module")
def tiny_state():
    spec, mesh = setup_mesh("sharding/cpu-1.yaml", devices=jax.devices()[:1])
    optimizer = OptimSection().build(total_steps=1)
    return init_stage_state(MODEL, preset_config("tiny"), optimizer, mesh, spec, seed=0)


@pytest.mark.parametrize("template", ["tulu", "qwen2.5", "native"])
def test_hf_export_prompts_like_training(tmp_path, tiny_state, template):
    """`tulu` over Qwen 2.5's tokenizer (whose own template is ChatML) must export the Tülu template."""
    from transformers import AutoTokenizer

    tokenizer = load_stage_tokenizer(TokenizerSection(path="qwen2.5", chat_template=template), MODEL)
    export_hf(tiny_state, tmp_path / "hf", tokenizer, None)
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    training_prompt = apply_chat_template(MESSAGES, qwen25_tokenizer(), template=template, add_generation_prompt=True)
    assert exported.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == training_prompt
    assert qwen25_tokenizer().chat_template != TULU_CHAT_TEMPLATE  # the shared tokenizer was not changed


def test_template_from_a_jinja_file_or_inline(tmp_path):
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    path = tmp_path / "plain.jinja"
    path.write_text(plain, encoding="utf-8")
    for spec in (str(path), plain):
        tokenizer = load_stage_tokenizer(TokenizerSection(path=TINY_TOKENIZER, chat_template=spec), MODEL)
        assert tokenizer.chat_template == plain
        text = apply_chat_template(MESSAGES, tokenizer, template=tokenizer.chat_template)
        assert text == "system: Be brief.\nuser: What is 2 + 2?\nassistant: 4\nuser: And 3 + 3?\n"


def test_unknown_template_is_named_in_the_error(tmp_path):
    with pytest.raises(ValueError, match=r"'tokenizer.chat_template' must be one of .*no file 'chatml'"):
        TokenizerSection(chat_template="chatml")


@pytest.fixture(scope="module")
def tokenizer_with_bos(tmp_path_factory):
    """The tiny tokenizer with a BOS token (the same string as EOS, as in OLMo 2's tokenizer)."""
    tokenizer = load_tokenizer(TINY_TOKENIZER)
    tokenizer.bos_token = tokenizer.eos_token
    path = tmp_path_factory.mktemp("bos") / "tokenizer"
    tokenizer.save_pretrained(str(path))
    return str(path)


def test_add_bos_starts_every_row_with_an_unsupervised_bos(tokenizer_with_bos):
    plain = load_stage_tokenizer(TokenizerSection(path=tokenizer_with_bos), MODEL)
    with_bos = load_stage_tokenizer(TokenizerSection(path=tokenizer_with_bos, add_bos=True), MODEL)
    conversation = [*MESSAGES, {"role": "assistant", "content": "6"}]
    a = tokenize_sft(conversation, plain, max_seq_len=512, template=plain.chat_template)
    b = tokenize_sft(conversation, with_bos, max_seq_len=512, template=with_bos.chat_template)
    assert a["input_ids"][0] != with_bos.bos_token_id
    assert b["input_ids"][0] == with_bos.bos_token_id and b["labels"][0] == IGNORE_INDEX
    np.testing.assert_array_equal(b["input_ids"][1:], a["input_ids"])
    np.testing.assert_array_equal(b["labels"][1:], a["labels"])


def test_add_bos_needs_a_bos_token_and_refuses_a_second_one(tokenizer_with_bos):
    with pytest.raises(ConfigError, match="no bos_token"):
        load_stage_tokenizer(TokenizerSection(path=TINY_TOKENIZER, add_bos=True), MODEL)
    with pytest.raises(ConfigError, match="already writes bos_token"):
        load_stage_tokenizer(
            TokenizerSection(path=tokenizer_with_bos, chat_template="{{ bos_token }}" + TULU_CHAT_TEMPLATE, add_bos=True),
            MODEL,
        )
