"""Text front-end against tortoise-tts 3.0.0's own tokenizer and text splitter: ids and chunks must be identical."""
import os

import pytest

from tortoise_ggml.utils import text as ours

SENTENCES = [
    "Hello, this is a test of the Tortoise text to speech system. It costs $3.50 on Dec. 5th!",
    "$1 and $1.01 and $0.01 and $2.00 and $.5 and $1.2.3 and $1,234.56",
    "£1,000,000 was paid; 1,234,567 people agreed.",
    "In 1984, 2000, 2005, 1900, 2019, 1001, 2999, 999, 3000 and 10000.",
    "1st 2nd 3rd 4th 11th 12th 13th 21st 22nd 101st 1000000th",
    "Pi is 3.14159, half is 0.5 and ten is 10.0.",
    "Mr. and Mrs. Smith met Dr. Jones at St. Paul's, Ft. Worth, with Capt., Lt., Sgt., Maj. and Gen. Rev. Hon. Esq.",
    "The co. is Ltd., says Col. Drs. Jr.",
    "Café naïve résumé — “smart quotes” … ‘single’ «guillemets» Ærøskøbing straße",
    "北京 Tōkyō Москва 🐢 emoji",
    'She said "hi" and left.',
    "  leading and trailing   spaces\tand\ttabs\nand\n\nnewlines  ",
    "UPPER CASE, MiXeD cAsE!",
    "What?! Really... no way!!! (parentheses) [brackets] {braces} <angles>",
    "a/b a\\b a|b a_b a-b a+b=c 50% #1 @home &co ~ ^ * `tick` 'apostrophe' semi; colon: comma,",
    "",
    " ",
    "0 00 007 1 12 123 1234 12345 123456 1234567 12345678901",
]


@pytest.fixture(scope="module")
def ref_tok(oracle):
    from tortoise.utils.tokenizer import VoiceBpeTokenizer
    return VoiceBpeTokenizer()


@pytest.fixture(scope="module")
def vocab_path(oracle):
    from tortoise.utils import tokenizer
    return tokenizer.DEFAULT_VOCAB_FILE


@pytest.fixture(scope="module")
def riding_hood(oracle):
    import tortoise
    with open(os.path.join(os.path.dirname(tortoise.__file__), "data", "riding_hood.txt")) as f:
        return f.read()


def test_cleaners_match(oracle):
    from tortoise.utils import tokenizer as ref
    for s in SENTENCES:
        assert ours.english_cleaners(s) == ref.english_cleaners(s), s
        assert ours.basic_cleaners(s) == ref.basic_cleaners(s), s
        assert ours.transliteration_cleaners(s) == ref.transliteration_cleaners(s), s


def test_encode_decode_match(ref_tok, vocab_path, riding_hood):
    tok = ours.VoiceBpeTokenizer(vocab_path)
    with open(vocab_path) as f:
        from_json = ours.VoiceBpeTokenizer(f.read())
    for s in SENTENCES + [riding_hood]:
        ids = tok.encode(s)
        assert ids == ref_tok.encode(s), s
        assert from_json.encode(s) == ids
        assert tok.decode(ids) == ref_tok.decode(ids)
    assert len(tok.encode(riding_hood)) > 1000  # the long text really went through the BPE


def test_basic_cleaners_option(vocab_path, oracle):
    from tortoise.utils.tokenizer import VoiceBpeTokenizer
    ref = VoiceBpeTokenizer(use_basic_cleaners=True)
    tok = ours.VoiceBpeTokenizer(vocab_path, use_basic_cleaners=True)
    for s in SENTENCES:
        assert tok.encode(s) == ref.encode(s), s


def test_decode_takes_numpy(vocab_path):
    import numpy as np
    tok = ours.VoiceBpeTokenizer(vocab_path)
    ids = tok.encode("numpy ids decode too")
    assert tok.decode(np.array(ids, dtype=np.int32)) == "numpy ids decode too"


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        ours.VoiceBpeTokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="could not be parsed"):
        ours.VoiceBpeTokenizer("{not json")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a tokenizers JSON"):
        ours.VoiceBpeTokenizer(bad)
    with pytest.raises(TypeError):
        ours.VoiceBpeTokenizer(42)


def test_encode_rejects_non_str(vocab_path):
    with pytest.raises(TypeError, match="takes a str"):
        ours.VoiceBpeTokenizer(vocab_path).encode(b"bytes")


def test_split_and_recombine_matches(oracle, riding_hood):
    from tortoise.utils.text import split_and_recombine_text as ref
    cases = [
        (riding_hood, 200, 300),
        (riding_hood, 50, 80),
        ("""
            This is a sample sentence.
            This is another sample sentence.
            This is a longer sample sentence that should force a split inthemiddlebutinotinthislongword.
            "Don't split my quote... please"
            """, 20, 40),
        ("When you are really angry sometimes you use consecutive exclamation marks!!!!!! Is this a good thing "
         "to do?!?!?!\nI don't know but we should handle this situation..........................", 30, 50),
        ("“Curly quotes” and \"straight quotes\" in one. " * 20, 60, 100),
        ("nopunctuationatallinthisverylongwordthatkeepsgoing " * 12, 40, 70),
        ("", 200, 300),
        ("...!!!", 200, 300),
    ]
    for text, desired, maximum in cases:
        got = ours.split_and_recombine_text(text, desired, maximum)
        assert got == ref(text, desired, maximum), (text[:40], desired, maximum)
    assert len(ours.split_and_recombine_text(riding_hood)) == 15


def test_tokenizer_from_model_file(small_gguf, ref_tok):
    import pyggml as pg
    from tortoise_ggml.weights.model_file import ModelFile
    mf = ModelFile(str(small_gguf), pg.Backend("cpu", threads=1), components=["rlg_auto"])
    tok = ours.VoiceBpeTokenizer.from_model_file(mf)
    for s in SENTENCES:
        assert tok.encode(s) == ref_tok.encode(s), s
