"""Text-level curation steps: normalize, length_filter, gopher_quality, gopher_repetition, c4, fineweb, pii.

Documents are built by hand to sit on each side of every threshold. Rule tests switch the other rules
of their step off, so each one checks a single rule; ordering and defaults are tested separately.
"""

from __future__ import annotations

import pyarrow as pa
import pytest
from pydantic import ValidationError

from tokenmill import TokenmillError
from tokenmill.curate.base import StepResult
from tokenmill.steps import STEPS
from tokenmill.curate import c4
from tokenmill.curate.c4 import C4
from tokenmill.curate.fineweb import FineWebQuality
from tokenmill.curate.gopher import GopherQuality, GopherRepetition
from tokenmill.curate.length import LengthFilter
from tokenmill.curate.normalize import Normalize
from tokenmill.curate.pii import PII
from tokenmill.documents.schema import make_table

ALL_STEPS = (Normalize, LengthFilter, GopherQuality, GopherRepetition, C4, FineWebQuality, PII)


def table(*texts: str) -> pa.Table:
    return make_table(
        {"id": f"d{i}", "text": text, "domain": "test", "source": f"test:{i}"} for i, text in enumerate(texts)
    )


def run(step, *texts: str) -> StepResult:
    result = step.process(table(*texts))
    assert_partition(result, len(texts), step.name)
    return result


def reasons(step, *texts: str) -> list[str]:
    """One entry per input text: '' if kept, else the reason it was removed."""
    result = run(step, *texts)
    removed = dict(zip(result.removed.column("id").to_pylist(), result.removed.column("reason").to_pylist()))
    return [removed.get(f"d{i}", "") for i in range(len(texts))]


def assert_partition(result: StepResult, n: int, step_name: str) -> None:
    """Every input row is either kept or removed, and every removed row says why and by which step."""
    kept, removed = result.kept.column("id").to_pylist(), result.removed.column("id").to_pylist()
    assert sorted(kept + removed) == sorted(f"d{i}" for i in range(n))
    assert all(result.removed.column("reason").to_pylist())
    assert set(result.removed.column("step").to_pylist()) <= {step_name}


def word(i: int, length: int = 5) -> str:
    """The i-th distinct lowercase word of the given length."""
    letters = []
    for _ in range(length):
        letters.append(chr(ord("a") + i % 26))
        i //= 26
    return "".join(letters)


def distinct(n: int, length: int = 5, offset: int = 0) -> list[str]:
    return [word(offset + i, length) for i in range(n)]


def prose(n_words: int, stop_words: int = 2) -> str:
    """One sentence of n_words words: the first stop_words distinct stop words ('the', 'and', ...), then
    'grass'."""
    return " ".join(["the", "and", "with"][:stop_words] + ["grass"] * (n_words - stop_words)) + "."


# ---- registration ----------------------------------------------------------------------------------
@pytest.mark.parametrize("step_class", ALL_STEPS)
def test_steps_register_with_documented_params(step_class):
    assert STEPS[step_class.name] is step_class
    assert step_class.Params().step == step_class.name
    for name, field in step_class.Params.model_fields.items():
        assert name == "step" or field.description, f"{step_class.name}.{name} has no description"
    with pytest.raises(ValidationError):
        step_class.Params(no_such_field=1)


# ---- normalize -------------------------------------------------------------------------------------
def test_normalize_whitespace_and_controls():
    text = (
        "  Title\r\n\r\nfirst  line\t\t with   runs  \r\n"
        "    indented   code\x07\n\n\n\n\n\nlast\ttab\x00  \n"
    )
    [out] = run(Normalize(), text).kept.column("text").to_pylist()
    assert out == "Title\n\nfirst line with runs\n    indented code\n\n\nlast\ttab"


def test_normalize_unicode_forms():
    decomposed, ligature = "cafe\u0301", "\ufb01ne"  # e + combining acute; the 'fi' ligature
    assert run(Normalize(), decomposed).kept.column("text").to_pylist() == ["caf\u00e9"]
    assert run(Normalize(), ligature).kept.column("text").to_pylist() == [ligature]
    assert run(Normalize(form="NFKC"), ligature).kept.column("text").to_pylist() == ["fine"]
    assert run(Normalize(form="none"), decomposed).kept.column("text").to_pylist() == [decomposed]


def test_normalize_removes_empty_documents_and_counts_changes():
    result = run(Normalize(), "already clean", " \x01\t\r\n ", "needs  work ")
    assert result.kept.column("text").to_pylist() == ["already clean", "needs work"]
    assert result.removed.column("reason").to_pylist() == ["empty"]
    assert result.removed.column("text").to_pylist() == [" \x01\t\r\n "]  # removed rows show the input
    assert result.counters["normalized"] == 1


def test_normalize_is_idempotent():
    first = run(Normalize(), "a  b \r\n\n\n\n\nc\u0301 ").kept
    assert run(Normalize(), *first.column("text").to_pylist()).counters["normalized"] == 0


# ---- length_filter ---------------------------------------------------------------------------------
def test_length_filter_each_bound():
    assert reasons(LengthFilter(min_chars=5), "abcd", "abcde") == ["too_short_chars", ""]
    assert reasons(LengthFilter(max_chars=5), "abcde", "abcdef") == ["", "too_long_chars"]
    assert reasons(LengthFilter(min_chars=2), "é", "éé") == ["too_short_chars", ""]  # code points
    assert reasons(LengthFilter(min_words=3), "one two", " one\ttwo\nthree ") == ["too_few_words", ""]
    assert reasons(LengthFilter(max_words=3), "a b c", "a b c d") == ["", "too_many_words"]


def test_length_filter_reason_order_and_validation():
    assert reasons(LengthFilter(min_chars=10, min_words=3), "a b") == ["too_short_chars"]
    with pytest.raises(ValidationError, match="min_words"):
        LengthFilter.Params(min_words=10, max_words=5)


# ---- gopher_quality --------------------------------------------------------------------------------
QUALITY_RULES = dict(
    min_words=None,
    max_words=None,
    min_mean_word_length=None,
    max_mean_word_length=None,
    max_symbol_word_ratio=None,
    max_bullet_lines_ratio=None,
    max_ellipsis_lines_ratio=None,
    min_alpha_words_ratio=None,
    min_stop_words=None,
)


def quality(**enabled) -> GopherQuality:
    return GopherQuality(**{**QUALITY_RULES, **enabled})


def test_gopher_quality_keeps_plain_prose_with_defaults():
    assert reasons(GopherQuality(), prose(60)) == [""]


def test_gopher_word_count():
    step = quality(min_words=50, max_words=100_000)
    # punctuation-only tokens are not words
    assert reasons(step, prose(49) + " -- ...", prose(50)) == ["gopher_word_count", ""]
    assert reasons(step, prose(100_000), prose(100_001)) == ["", "gopher_word_count"]


def test_gopher_mean_word_length():
    step = quality(min_mean_word_length=3, max_mean_word_length=10)
    three = " ".join(["cat,"] * 50)  # attached punctuation does not count
    assert reasons(step, three, three.replace("cat", "at", 1)) == ["", "gopher_mean_word_length"]
    # 2 x 3 + 14 x 11 + 34 x 10 = 500 characters over 50 words: exactly 10
    ten = ["the"] * 2 + ["a" * 11] * 14 + ["b" * 10] * 34
    longer = ["the"] * 2 + ["a" * 11] * 15 + ["b" * 10] * 33
    assert reasons(step, " ".join(ten), " ".join(longer)) == ["", "gopher_mean_word_length"]


@pytest.mark.parametrize(
    "symbol, reason",
    [("#", "gopher_hash_ratio"), ("...", "gopher_ellipsis_ratio"), ("…", "gopher_ellipsis_ratio")],
)
def test_gopher_symbol_ratio(symbol, reason):
    def doc(n_symbols: int) -> str:  # 60 tokens, the symbol glued to n of them
        return " ".join(f"garden{symbol}" if i < n_symbols else "garden" for i in range(60)) + "."

    assert reasons(quality(max_symbol_word_ratio=0.1), doc(6), doc(7)) == ["", reason]


@pytest.mark.parametrize("bullet", ["•", "-"])
def test_gopher_bullet_lines(bullet):
    def doc(n_bullets: int) -> str:  # 10 lines
        return "\n".join(f"  {bullet} some words." if i < n_bullets else "some words." for i in range(10))

    assert reasons(quality(max_bullet_lines_ratio=0.9), doc(9), doc(10)) == ["", "gopher_bullet_lines"]


def test_gopher_ellipsis_lines():
    def doc(n_ellipses: int) -> str:  # 10 lines
        return "\n".join("it trails off..." if i < n_ellipses else "it ends well." for i in range(10))

    step = quality(max_ellipsis_lines_ratio=0.3)
    assert reasons(step, doc(3), doc(4)) == ["", "gopher_ellipsis_lines"]
    unicode_ellipses = [doc(3).replace("...", "…"), doc(4).replace("...", "…")]
    assert reasons(step, *unicode_ellipses) == ["", "gopher_ellipsis_lines"]


def test_gopher_alpha_words():
    def doc(n_numbers: int) -> str:  # 60 tokens
        return " ".join("1234" if i < n_numbers else "word" for i in range(60))

    step = quality(min_alpha_words_ratio=0.8)
    assert reasons(step, doc(12), doc(13)) == ["", "gopher_alpha_words"]
    assert reasons(step, doc(13).replace("1234", "1é34")) == [""]  # one letter is enough
    assert reasons(step, doc(13).replace("1234", "--")) == ["gopher_alpha_words"]  # punctuation tokens count


def test_gopher_stop_words():
    step = quality(min_stop_words=2)
    assert reasons(step, prose(60, stop_words=1), prose(60, stop_words=2)) == ["gopher_stop_words", ""]
    assert reasons(step, "The garden, and then theory.") == [""]  # case-insensitive, whole words only
    assert reasons(step, "theory thesis andante") == ["gopher_stop_words"]
    assert reasons(quality(min_stop_words=2, stop_words=["le", "la"]), "le chat et la souris") == [""]


def test_gopher_stop_words_counts_distinct_words():
    step = quality(min_stop_words=2)
    assert reasons(step, "the the grass grass", "The grass and grass") == ["gopher_stop_words", ""]


def test_gopher_quality_first_failing_rule_in_paper_order():
    short_and_numeric = "1 2 3 4"  # fails word count, mean length, alpha words and stop words
    many_bullets = "\n".join(f"• {'1234 ' * 8}" for _ in range(10))  # bullets and alpha words
    expected = ["gopher_word_count", "gopher_bullet_lines"]
    assert reasons(GopherQuality(), short_and_numeric, many_bullets) == expected


# ---- gopher_repetition -----------------------------------------------------------------------------
REPETITION_RULES = dict(
    dup_line_frac=None,
    dup_para_frac=None,
    dup_line_char_frac=None,
    dup_para_char_frac=None,
    top_n_grams={},
    dup_n_grams={},
)


def repetition(**enabled) -> GopherRepetition:
    return GopherRepetition(**{**REPETITION_RULES, **enabled})


def unique_line(i: int) -> str:
    return " ".join(distinct(8, offset=8 * i)) + "."


def interleave(unique: list[str], repeated: str, times: int, separator: str) -> str:
    parts = []
    for i, part in enumerate(unique):
        parts.append(part)
        if i < times:
            parts.append(repeated)
    parts += [repeated] * (times - len(unique))
    return separator.join(parts)


def test_repetition_keeps_distinct_text_with_defaults():
    text = "\n".join(unique_line(i) for i in range(30))
    assert reasons(GopherRepetition(), text) == [""]


def test_dup_line_frac():
    step = repetition(dup_line_frac=0.3)
    lines = [unique_line(i) for i in range(6)]
    three_of_ten = interleave(lines, "Thanks.", 4, "\n")  # 10 lines, 3 repeat an earlier "Thanks."
    four_of_eleven = interleave(lines, "Thanks.", 5, "\n")
    assert reasons(step, three_of_ten, four_of_eleven) == ["", "dup_line_frac"]
    blank_lines_between = interleave(lines, "Thanks.", 5, "\n\n\n")  # blank lines are not lines
    assert reasons(step, blank_lines_between) == ["dup_line_frac"]


def test_dup_para_frac():
    step = repetition(dup_para_frac=0.3, dup_line_frac=0.3)
    paragraphs = ["\n".join(unique_line(3 * i + j) for j in range(3)) for i in range(6)]
    # 6 three-line paragraphs plus "Thanks." paragraphs: few repeated lines, many repeated paragraphs
    three_of_ten = interleave(paragraphs, "Thanks.", 4, "\n\n")
    four_of_eleven = interleave(paragraphs, "Thanks.", 5, "\n\n")
    assert reasons(step, three_of_ten, four_of_eleven) == ["", "dup_para_frac"]


def _repeated_piece_doc(piece: str, total_chars: int, separator: str) -> str:
    """A document of ``total_chars`` characters in which ``piece`` occurs twice, padded with a distinct
    filler piece."""
    filler_length = total_chars - 2 * len(piece) - 2 * len(separator)
    return separator.join([piece, "x" * filler_length, piece])


@pytest.mark.parametrize(
    "separator, rule", [("\n", "dup_line_char_frac"), ("\n\n", "dup_para_char_frac")]
)
def test_duplicate_character_fractions(separator, rule):
    piece = "y" * 20  # one repetition holds 20 characters: 20 / 100 = 0.2 is allowed, 20 / 99 is not
    step = repetition(**{rule: 0.2})
    docs = [_repeated_piece_doc(piece, 100, separator), _repeated_piece_doc(piece, 99, separator)]
    assert [len(d) for d in docs] == [100, 99]
    assert reasons(step, *docs) == ["", rule]


def _padded(words: list[str], total_chars: int) -> str:
    """Join words and append one distinct filler word to reach exactly total_chars characters."""
    text = " ".join(words)
    return text + " " + "z" * (total_chars - len(text) - 1)


def test_top_n_gram_char_fraction():
    step = repetition(top_n_grams={2: 0.2})
    # "ab cd" (5 characters with its space) four times = 20 characters
    words = []
    for i in range(4):
        words += ["ab", "cd", word(i, 3)]
    assert reasons(step, _padded(words, 100), _padded(words, 99)) == ["", "top_2_gram"]


def test_top_n_gram_ignores_n_grams_seen_once():
    assert reasons(repetition(top_n_grams={2: 0.2}), "alpha beta gamma") == [""]


def test_duplicate_n_gram_char_fraction():
    step = repetition(dup_n_grams={5: 0.15})
    phrase = ["aaa", "bbb", "ccc", "ddd", "eee"]  # repeated once: 15 characters of words
    words = phrase + ["sep"] + phrase
    assert reasons(step, _padded(words, 100), _padded(words, 99)) == ["", "dup_5_gram"]


def test_overlapping_duplicate_n_grams_count_each_word_once():
    step = repetition(dup_n_grams={5: 0.15})
    phrase = ["aaa", "bbb", "ccc", "ddd", "eee", "fff"]  # two overlapping repeated 5-grams: 18 characters
    words = phrase + ["sep"] + phrase
    assert reasons(step, _padded(words, 120), _padded(words, 119)) == ["", "dup_5_gram"]


def test_n_grams_do_not_repeat_across_documents():
    sentence = " ".join(distinct(30)) + "."
    assert reasons(GopherRepetition(), sentence, sentence) == ["", ""]


def test_repetition_first_failing_rule_in_table_order():
    same_line = "\n".join(["the same line again and again."] * 10)
    looping = " ".join(["one two three four five six"] * 20)  # a single line, n-grams repeat
    assert reasons(GopherRepetition(), same_line, looping) == ["dup_line_frac", "top_2_gram"]


# ---- c4 --------------------------------------------------------------------------------------------
C4_PAGE = "\n".join(
    [
        "Home | About | Contact",
        "The first sentence is long enough to keep.",
        "Too short to keep.",
        "Our site uses cookies to give you the best experience.",
        "A second good line cites a source [12] and ends here.",
        "Please enable JavaScript in your browser to continue reading.",
        "   The third line keeps going and going...",
        "A third kept line asks a question? It does! It also says more.",
    ]
)


def test_c4_line_filtering_output():
    result = run(C4(), C4_PAGE)
    assert result.kept.column("text").to_pylist() == [
        "The first sentence is long enough to keep.\n"
        "A second good line cites a source  and ends here.\n"
        "A third kept line asks a question? It does! It also says more."
    ]
    assert result.counters == {
        "lines_removed_long_word": 0,
        "lines_removed_no_terminal_punct": 2,
        "lines_removed_too_few_words": 1,
        "lines_removed_javascript": 1,
        "lines_removed_policy": 1,
    }


def test_c4_words_per_line_threshold():
    four, five = "Four words end here.", "Five words do end here."
    result = run(C4(min_sentences=1), f"{four}\n{five}")
    assert result.kept.column("text").to_pylist() == [five]


def test_c4_words_split_on_unicode_whitespace():
    spaced = "This line has plenty of words."
    glued = spaced.replace(" ", "\u00a0")  # a non-breaking space, which NFC keeps
    assert reasons(C4(min_sentences=1), spaced, glued) == ["", ""]


def test_c4_sentence_threshold():
    two = "One sentence is here now. Two sentences are here now."
    three = two + "\nAnd a third sentence is here now."
    assert reasons(C4(), two, three) == ["too_few_sentences", ""]
    assert reasons(C4(min_sentences=5, min_words_per_line=3), three) == ["too_few_sentences"]


def test_c4_sentences_come_from_a_sentence_splitter():
    abbreviations = "Dr. Smith met Mr. Jones and Mrs. Brown at the U.S. embassy at 5 p.m. today."
    three = "It rained all day. We stayed inside the house. The old roof held up."
    assert reasons(C4(min_sentences=2), abbreviations, three) == ["too_few_sentences", ""]


def test_c4_splits_sentences_only_where_line_count_is_not_decisive(monkeypatch):
    split = []
    monkeypatch.setattr(c4, "_count_sentences", lambda lines: split.extend(lines) or [1] * len(lines))
    few_lines = "It rained all day. We stayed inside the house.\nThe old roof held up well."
    many_lines = "\n".join(["Each of these lines is a sentence."] * 3)
    assert reasons(C4(), few_lines, many_lines) == ["too_few_sentences", ""]
    assert split == few_lines.split("\n")


@pytest.mark.parametrize("end", [".", "?", "!", '"'])
def test_c4_end_marks(end):
    line = f"This line of several words ends with a mark{end}"
    assert reasons(C4(min_sentences=1), line) == [""]
    assert reasons(C4(min_sentences=1, end_marks=".?!" if end == '"' else '"'), line) == ["too_few_sentences"]


def test_c4_terminal_punctuation_rule_can_be_switched_off():
    lines = ["A heading line with no end mark", "A line that trails off with more words...", GOOD_PROSE]
    result = run(C4(filter_no_terminal_punct=False), "\n".join(lines))
    assert result.kept.column("text").to_pylist() == ["\n".join(lines)]
    assert result.counters["lines_removed_no_terminal_punct"] == 0


def test_c4_long_words():
    step = C4(min_sentences=1, max_word_length=10)
    ten, eleven = "This line has one word abcdefghij here.", "This line has one word abcdefghijk here."
    assert run(step, f"{ten}\n{eleven}").kept.column("text").to_pylist() == [ten]
    assert run(step, f"{ten}\n{eleven}").counters["lines_removed_long_word"] == 1


GOOD_PROSE = "Plenty of good words are written here. More good words are here. And more good words here."


def test_c4_document_rules():
    good = GOOD_PROSE
    assert reasons(
        C4(),
        good,
        good + "\nLorem ipsum dolor sit amet, consectetur adipiscing.",
        good + "\nThe function body is { return one plus one; } here.",
        good + "\nA brace { in a line without an end mark",  # only lines C4 would keep count
    ) == ["", "lorem_ipsum", "curly_bracket", ""]
    lenient = C4(filter_curly_bracket=False, filter_lorem_ipsum=False)
    assert reasons(lenient, good + "\nLorem ipsum { dolor sit amet.") == [""]


def test_c4_bad_words(tmp_path):
    good = GOOD_PROSE
    words = tmp_path / "bad.txt"
    words.write_text("darn\nheck no\n\n", encoding="utf-8")
    step = C4(bad_words_path=words)
    docs = [good, good + " Darn it, bad.", good + " Darning socks is fine.", good + " Oh heck no, never."]
    assert reasons(step, *docs) == ["", "bad_words", "", "bad_words"]
    with pytest.raises(TokenmillError, match="bad_words_path"):
        C4(bad_words_path=tmp_path / "missing.txt")


# ---- fineweb ---------------------------------------------------------------------------------------
FINEWEB_RULES = dict(
    line_punct_thr=None, short_line_thr=None, char_duplicates_ratio=None, new_line_ratio=None
)


def fineweb(**enabled) -> FineWebQuality:
    return FineWebQuality(**{**FINEWEB_RULES, **enabled})


def test_fineweb_line_punct_ratio():
    def doc(n_punct: int) -> str:  # 100 lines
        return "\n".join(f"{word(i)} ends here." if i < n_punct else f"{word(i)} no end" for i in range(100))

    step = fineweb(line_punct_thr=0.12)
    assert reasons(step, doc(12), doc(13)) == ["line_punct_ratio", ""]
    exempt_zero = fineweb(line_punct_thr=0.12, line_punct_exclude_zero=True)
    assert reasons(exempt_zero, doc(0), doc(5)) == ["", "line_punct_ratio"]


def test_fineweb_short_line_ratio():
    def doc(n_short: int) -> str:  # 100 lines of 30 (short) or 31 characters
        return "\n".join(word(i, 30 if i < n_short else 31) for i in range(100))

    assert reasons(fineweb(short_line_thr=0.67), doc(66), doc(67)) == ["", "short_line_ratio"]


def test_fineweb_char_duplicates_ratio():
    def doc(repeated_chars: int, other_chars: int) -> str:
        """``other_chars`` characters besides newlines, ``repeated_chars`` of them in a repeated line and
        6 in two blank-looking lines, which are not lines for this rule."""
        repeated = "r" * repeated_chars
        unique = "u" * (other_chars - 2 * repeated_chars - 6)
        return "\n\n".join([repeated, unique, repeated, "   ", "   "])

    step = fineweb(char_duplicates_ratio=0.01)
    assert reasons(step, doc(10, 1002), doc(10, 1000)) == ["", "char_dup_ratio"]


def test_fineweb_list_ratio():
    def doc(n_words: int) -> str:  # 10 lines, 9 newlines
        words = distinct(n_words)
        return "\n".join(" ".join(words[i::10]) for i in range(10))

    assert reasons(fineweb(new_line_ratio=0.3), doc(30), doc(29)) == ["", "list_ratio"]


def test_fineweb_reason_order():
    no_punct_short_lines = "\n".join(["a"] * 20)
    assert reasons(FineWebQuality(), no_punct_short_lines) == ["line_punct_ratio"]


# ---- pii -------------------------------------------------------------------------------------------
def masked(step, text: str) -> str:
    result = run(step, text)
    assert result.removed.num_rows == 0
    return result.kept.column("text").to_pylist()[0]


def test_pii_masks_emails_ips_and_phones():
    text = "Write to jane.doe+news@mail.example.org, call (555) 123-4567 or +44 20 7946 0958; server 8.8.8.8."
    result = run(PII(), text)
    [out] = result.kept.column("text").to_pylist()
    assert out == "Write to <EMAIL>, call <PHONE> or <PHONE>; server <IP>."
    assert result.counters == {"email": 1, "ip": 1, "phone": 2}


def test_pii_leaves_versions_and_non_addresses():
    text = "Python 3.11.7, build 1.2.3.4.5, 999.1.1.1, v8.8.8.8, 12:30:45, std::vector, x :: Int, 2024-01-15."
    assert masked(PII(), text) == text
    assert masked(PII(public_ips_only=False), text) == text


def test_pii_private_ips_only_when_asked():
    text = "gateway 192.168.1.1 loopback 127.0.0.1 public 1.1.1.1 v6 2001:4860:4860::8888 local fe80::1"
    public = "gateway 192.168.1.1 loopback 127.0.0.1 public <IP> v6 <IP> local fe80::1"
    assert masked(PII(), text) == public
    every = "gateway <IP> loopback <IP> public <IP> v6 <IP> local <IP>"
    assert masked(PII(public_ips_only=False), text) == every


def test_pii_replacements_and_kinds_are_configurable():
    text = "mail a@b.io from 8.8.4.4"
    assert masked(PII(email_replacement="[mail]", ip_replacement="[ip]"), text) == "mail [mail] from [ip]"
    result = run(PII(mask=["ip"]), text)
    assert result.kept.column("text").to_pylist() == ["mail a@b.io from <IP>"]
    assert result.counters == {"ip": 1}


def test_pii_untouched_documents_stay_identical():
    texts = ["no personal data here", "a@b.io"]
    assert run(PII(), *texts).kept.column("text").to_pylist() == ["no personal data here", "<EMAIL>"]


# ---- every step --------------------------------------------------------------------------------------
@pytest.mark.parametrize("step_class", ALL_STEPS)
def test_rejected_rows_carry_reason_and_step(step_class):
    texts = ["", "x", "1 2 3", C4_PAGE, prose(80), "\n".join(["same line."] * 40), "mail a@b.io " * 30]
    batch = table(*texts)
    result = step_class().process(batch)
    assert_partition(result, len(texts), step_class.name)
    assert result.kept.schema.equals(batch.schema)
    assert result.removed.column_names == batch.column_names + ["reason", "step"]
    assert set(result.removed.column("step").to_pylist()) <= {step_class.name}
