"""Raw text to words the way CoNLL-2003 writes them, each with its character span in the line.

CoNLL data (Reuters, tokenised Penn-Treebank style) has punctuation as words of its own
(`Siemens .`, `" Hello , "`), clitics split off (`Germany 's`, `do n't`), and keeps whole
what reads as one unit: `U.S.`, `Inc.`, `3.5`, `1,000`, `1996-08-28`, `6-4`, `1/2`, `S&P`,
`one-day`, `O'Brien`. A model fine-tuned on it tags such words best, so `predict --format text`
splits lines the same way rather than on whitespace.

nltk's `TreebankWordTokenizer().span_tokenize` was the candidate library; it splits a period
off only at the end of the string (`team. Then` stays `team.`), and only ASCII punctuation
(`Москву.`, `गया।`, `القاهرة،` and `北京。` stay glued), so this is a small regex tokeniser over
Unicode classes instead. Han characters are one word each (Chinese has no spaces; its NER
corpora tag characters); other unspaced scripts (Thai, Japanese kana) stay one word per run.

Every character that is not whitespace (`str.isspace`) belongs to exactly one word, in order,
and `line[start:end]` is always the word: nothing is dropped, converted or normalised.
"""

from __future__ import annotations

import regex

# Letters with their combining marks (Devanagari vowel signs, Arabic harakat), digits, and the
# zero-width (non-)joiners that Persian and Indic words contain; Han characters stand alone.
_W = r"[[\p{L}\p{M}\p{N}\p{Join_Control}]--\p{Han}]"
_NOT_W = r"(?<![\p{L}\p{M}\p{N}])"
# Whitespace as str.isspace has it: regex's \s leaves out U+001C..U+001F.
_SPACE = r"[\s\x1c-\x1f]"
# Abbreviations that keep their period in CoNLL-2003 (those it has, and a few as common).
_ABBREVIATIONS = (
    "Mr Mrs Ms Dr Prof Rev St Mt Ft Jr Sr Lt Col Capt Gen Gov Sen Rep Inc Corp Co Ltd Bros vs etc "
    "Jan Feb Apr Aug Sep Sept Oct Nov Dec Calif Fla"
).split()
# English clitics that CoNLL writes as words of their own: Germany 's, do n't, I 'm.
_CLITIC = r"(?i:['’](?:s|re|ve|ll|d|m)|n['’]t)(?![\p{L}\p{M}\p{N}])"
# A word character that does not begin a clitic ending the word (the n of don't).
_WC = rf"(?:(?![nN]['’][tT](?![\p{{L}}\p{{M}}\p{{N}}])){_W})"
# What joins two runs of word characters into one word: hyphens, &, an apostrophe that does not
# begin a clitic (O'Brien, but Germany|'s), and . , : / between digits (3.5, 1,000, 10:30, 1/2).
_JOIN = rf"(?:[-‐‑&]|(?!{_CLITIC})['’]|(?<=\p{{N}})[.,:/](?=\p{{N}}))"

_TOKEN = regex.compile(
    rf"""(?V1x)
    {_NOT_W} \p{{L}}\p{{M}}* (?: \.\p{{L}}\p{{M}}* )+ \.? (?![\p{{L}}\p{{M}}\p{{N}}])  # U.S.  a.m.  F.C.
  | {_NOT_W} (?:{"|".join(_ABBREVIATIONS)}) \.                                        # Inc.  vs.
  | {_NOT_W} \p{{Lu}} \. (?={_SPACE}+\p{{Lu}})                                         # initials: J. Smith
  | (?<=^{_SPACE}*) \p{{N}}{{1,3}} \. (?={_SPACE})                                      # a list's 1.  2.
  | {_NOT_W} \p{{Lu}}{{1,3}} \$                                                         # US$  C$  HK$
  | {_CLITIC}                                                                          # 's  n't
  | {_WC}+ (?: {_JOIN} {_WC}+ )*                                                       # words, numbers
  | \p{{Han}}\p{{M}}*                                                                  # one Han character
  | \.{{2,}} | -{{2,}}                                                                  # ...  --
  | [^\s\x1c-\x1f]\p{{M}}*                                                             # any other character
    """
)


def word_spans(line: str) -> list[tuple[int, int]]:
    """The `(start, end)` character span of each word of `line`, in order: `line[start:end]` is the word.

    Spans never overlap, never contain whitespace, and together cover every other character.
    """
    return [m.span() for m in _TOKEN.finditer(line)]


def split_words(line: str) -> list[str]:
    """The words of `line` (see `word_spans`)."""
    return [line[s:e] for s, e in word_spans(line)]
