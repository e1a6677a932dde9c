"""Text front-end: tortoise/utils/tokenizer.py (english_cleaners, VoiceBpeTokenizer) and tortoise/utils/text.py
(split_and_recombine_text), without torch and without the tortoise package.

The cleaners come from keithito/tacotron by way of tortoise; they are kept line for line so the token ids equal
tortoise's for any text (inflect and unidecode are the same libraries tortoise uses). The BPE vocabulary is the JSON
that the GGUF stores (``ModelFile.tokenizer_json``) or a tokenizer.json file.
"""
from __future__ import annotations

import os
import re
from typing import Iterable

import inflect
from tokenizers import Tokenizer
from unidecode import unidecode

# ---------------------------------------------------------------------------------------------------------------
# tortoise/utils/tokenizer.py: cleaners
# ---------------------------------------------------------------------------------------------------------------
_whitespace_re = re.compile(r'\s+')

_abbreviations = [(re.compile('\\b%s\\.' % x[0], re.IGNORECASE), x[1]) for x in [
    ('mrs', 'misess'),
    ('mr', 'mister'),
    ('dr', 'doctor'),
    ('st', 'saint'),
    ('co', 'company'),
    ('jr', 'junior'),
    ('maj', 'major'),
    ('gen', 'general'),
    ('drs', 'doctors'),
    ('rev', 'reverend'),
    ('lt', 'lieutenant'),
    ('hon', 'honorable'),
    ('sgt', 'sergeant'),
    ('capt', 'captain'),
    ('esq', 'esquire'),
    ('ltd', 'limited'),
    ('col', 'colonel'),
    ('ft', 'fort'),
]]


def expand_abbreviations(text: str) -> str:
    for regex, replacement in _abbreviations:
        text = re.sub(regex, replacement, text)
    return text


_inflect = inflect.engine()
_comma_number_re = re.compile(r'([0-9][0-9\,]+[0-9])')
_decimal_number_re = re.compile(r'([0-9]+\.[0-9]+)')
_pounds_re = re.compile(r'£([0-9\,]*[0-9]+)')
_dollars_re = re.compile(r'\$([0-9\.\,]*[0-9]+)')
_ordinal_re = re.compile(r'[0-9]+(st|nd|rd|th)')
_number_re = re.compile(r'[0-9]+')


def _remove_commas(m):
    return m.group(1).replace(',', '')


def _expand_decimal_point(m):
    return m.group(1).replace('.', ' point ')


def _expand_dollars(m):
    match = m.group(1)
    parts = match.split('.')
    if len(parts) > 2:
        return match + ' dollars'  # unexpected format: tortoise leaves the digits for _expand_number
    dollars = int(parts[0]) if parts[0] else 0
    cents = int(parts[1]) if len(parts) > 1 and parts[1] else 0
    if dollars and cents:
        dollar_unit = 'dollar' if dollars == 1 else 'dollars'
        cent_unit = 'cent' if cents == 1 else 'cents'
        return '%s %s, %s %s' % (dollars, dollar_unit, cents, cent_unit)
    elif dollars:
        dollar_unit = 'dollar' if dollars == 1 else 'dollars'
        return '%s %s' % (dollars, dollar_unit)
    elif cents:
        cent_unit = 'cent' if cents == 1 else 'cents'
        return '%s %s' % (cents, cent_unit)
    else:
        return 'zero dollars'


def _expand_ordinal(m):
    return _inflect.number_to_words(m.group(0))


def _expand_number(m):
    num = int(m.group(0))
    if num > 1000 and num < 3000:
        # years are read in pairs ("nineteen eighty-four"), as tortoise does
        if num == 2000:
            return 'two thousand'
        elif num > 2000 and num < 2010:
            return 'two thousand ' + _inflect.number_to_words(num % 100)
        elif num % 100 == 0:
            return _inflect.number_to_words(num // 100) + ' hundred'
        else:
            return _inflect.number_to_words(num, andword='', zero='oh', group=2).replace(', ', ' ')
    else:
        return _inflect.number_to_words(num, andword='')


def normalize_numbers(text: str) -> str:
    try:
        return _normalize_numbers(text)
    except inflect.NumOutOfRangeError:
        # tortoise dies here with inflect's message-less error
        big = max(re.findall(r"\d+", text), key=len)
        raise ValueError(f"the number {big[:20]}{'...' if len(big) > 20 else ''} ({len(big)} digits) is too large "
                         "to read out: write it in words or separate its digits") from None


def _normalize_numbers(text: str) -> str:
    # the order matters: commas go before currency, currency before decimals, ordinals before plain numbers
    text = re.sub(_comma_number_re, _remove_commas, text)
    text = re.sub(_pounds_re, r'\1 pounds', text)
    text = re.sub(_dollars_re, _expand_dollars, text)
    text = re.sub(_decimal_number_re, _expand_decimal_point, text)
    text = re.sub(_ordinal_re, _expand_ordinal, text)
    text = re.sub(_number_re, _expand_number, text)
    return text


def expand_numbers(text: str) -> str:
    return normalize_numbers(text)


def lowercase(text: str) -> str:
    return text.lower()


def collapse_whitespace(text: str) -> str:
    return re.sub(_whitespace_re, ' ', text)


def convert_to_ascii(text: str) -> str:
    return unidecode(text)


def basic_cleaners(text: str) -> str:
    """Lowercase and collapse whitespace, without transliteration."""
    text = lowercase(text)
    text = collapse_whitespace(text)
    return text


def transliteration_cleaners(text: str) -> str:
    """For non-English text: transliterate to ASCII."""
    text = convert_to_ascii(text)
    text = lowercase(text)
    text = collapse_whitespace(text)
    return text


def english_cleaners(text: str) -> str:
    """English text, with number and abbreviation expansion (what tortoise's tokenizer uses by default)."""
    text = convert_to_ascii(text)
    text = lowercase(text)
    text = expand_numbers(text)
    text = expand_abbreviations(text)
    text = collapse_whitespace(text)
    text = text.replace('"', '')
    return text


# ---------------------------------------------------------------------------------------------------------------
# tortoise/utils/tokenizer.py: VoiceBpeTokenizer
# ---------------------------------------------------------------------------------------------------------------
def _load_tokenizer(source: str | os.PathLike) -> Tokenizer:
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise TypeError(f"tokenizer source must be a JSON string or a path, not {type(source).__name__}")
    if source.lstrip().startswith('{'):
        try:
            return Tokenizer.from_str(source)
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"the tokenizer JSON could not be parsed: {e}") from None
    if not os.path.isfile(source):
        raise FileNotFoundError(f"no tokenizer file at {source!r} (pass the JSON text or a tokenizer.json path)")
    try:
        return Tokenizer.from_file(source)
    except Exception as e:
        raise ValueError(f"{source!r} is not a tokenizers JSON file: {e}") from None


# tortoise api.py pads the text tokens with one 0 (F.pad(text_tokens, (0, 1)))
TTS_TEXT_PAD = 1


class VoiceBpeTokenizer:
    """Text -> BPE ids exactly as tortoise's VoiceBpeTokenizer.

    ``vocab``: the tokenizer JSON text (``ModelFile.tokenizer_json``) or a path to a tokenizer.json file.
    """

    def __init__(self, vocab: str | os.PathLike, use_basic_cleaners: bool = False):
        self.tokenizer = _load_tokenizer(vocab)
        if use_basic_cleaners:
            self.preprocess_text = basic_cleaners
        else:
            self.preprocess_text = english_cleaners

    @classmethod
    def from_model_file(cls, model_file, use_basic_cleaners: bool = False) -> "VoiceBpeTokenizer":
        """The tokenizer stored in a tortoise GGUF (a ``ModelFile``)."""
        return cls(model_file.tokenizer_json, use_basic_cleaners)

    def encode(self, txt: str) -> list[int]:
        if not isinstance(txt, str):
            raise TypeError(f"encode takes a str, not {type(txt).__name__}")
        txt = self.preprocess_text(txt)
        # the vocabulary has no space token: tortoise spells spaces as [SPACE]
        txt = txt.replace(' ', '[SPACE]')
        return self.tokenizer.encode(txt).ids

    def decode(self, seq: Iterable[int]) -> str:
        ids = [int(i) for i in seq]  # accepts lists and numpy arrays alike
        txt = self.tokenizer.decode(ids, skip_special_tokens=False).replace(' ', '')
        txt = txt.replace('[SPACE]', ' ')
        txt = txt.replace('[STOP]', '')
        txt = txt.replace('[UNK]', '')
        return txt

    def tts_length(self, txt: str) -> int:
        """How many text tokens TextToSpeech.tts feeds the AR model for ``txt``: the ids and tortoise's trailing pad
        ("This may not be necessary."): what the model's max_text_tokens limits."""
        return len(self.encode(txt)) + TTS_TEXT_PAD


# ---------------------------------------------------------------------------------------------------------------
# tortoise/utils/text.py
# ---------------------------------------------------------------------------------------------------------------
def split_and_recombine_text(text: str, desired_length: int = 200, max_length: int = 300) -> list[str]:
    """Split text into chunks of about ``desired_length`` characters (at most ``max_length``), keeping sentences
    and quotes whole where possible. The model cannot read more than ~400 tokens, so tortoise speaks long text
    chunk by chunk."""
    if not isinstance(text, str):
        raise TypeError(f"split_and_recombine_text takes a str, not {type(text).__name__}")
    # normalize text, remove redundant whitespace and convert non-ascii quotes to ascii
    text = re.sub(r'\n\n+', '\n', text)
    text = re.sub(r'\s+', ' ', text)
    text = re.sub(r'[“”]', '"', text)

    rv = []
    in_quote = False
    current = ""
    split_pos = []
    pos = -1
    end_pos = len(text) - 1

    def seek(delta):
        nonlocal pos, in_quote, current
        is_neg = delta < 0
        for _ in range(abs(delta)):
            if is_neg:
                pos -= 1
                current = current[:-1]
            else:
                pos += 1
                current += text[pos]
            if text[pos] == '"':
                in_quote = not in_quote
        return text[pos]

    def peek(delta):
        p = pos + delta
        return text[p] if p < end_pos and p >= 0 else ""

    def commit():
        nonlocal current, split_pos
        rv.append(current)
        current = ""
        split_pos = []

    while pos < end_pos:
        c = seek(1)
        # do we need to force a split?
        if len(current) >= max_length:
            if len(split_pos) > 0 and len(current) > (desired_length / 2):
                # we have at least one sentence and we are over half the desired length, seek back to the last split
                d = pos - split_pos[-1]
                seek(-d)
            else:
                # no full sentences, seek back until we are not in the middle of a word and split there
                while c not in '!?.\n ' and pos > 0 and len(current) > desired_length:
                    c = seek(-1)
            commit()
        # check for sentence boundaries
        elif not in_quote and (c in '!?\n' or (c == '.' and peek(1) in '\n ')):
            # seek forward if we have consecutive boundary markers but still within the max length
            while pos < len(text) - 1 and len(current) < max_length and peek(1) in '!?.':
                c = seek(1)
            split_pos.append(pos)
            if len(current) >= desired_length:
                commit()
        # treat end of quote as a boundary if its followed by a space or newline
        elif in_quote and peek(1) == '"' and peek(2) in '\n ':
            seek(2)
            split_pos.append(pos)
    rv.append(current)

    # clean up, remove lines with only whitespace or punctuation
    rv = [s.strip() for s in rv]
    rv = [s for s in rv if len(s) > 0 and not re.match(r'^[\s\.,;:!?]*$', s)]

    return rv
