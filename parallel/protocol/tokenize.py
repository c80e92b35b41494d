"""o200k encoding whose cost is bounded by the text's length, whatever the text.

o200k splits text into pieces (runs of letters, of punctuation, of whitespace, numbers of up to 3 digits) and
byte-pair merges each piece at a cost that grows with the square of its length: 600,000 letters with no break
took harmony minutes, holding the GIL all along. Every piece lies inside a run of letters and combining marks
(LETTERS) or a run of characters that are neither letters nor digits (OTHERS), so runs longer than LONGEST_RUN
are encoded LONGEST_RUN characters at a time: no piece the tokenizer sees is longer, and each byte costs at most
a bounded time. Such runs are not ordinary text (the longest word of any language, a line of dashes and a
paragraph's indentation are far shorter): their tokens differ from harmony's own, though they decode to the
same text. Text without them is encoded by harmony as it is, token for token.
"""

from __future__ import annotations

import functools
import re

import regex
from openai_harmony import HarmonyEncoding

# 512 characters (2 KiB at most) merge in ~2 ms at worst: about 1 us a byte (4 MiB of emoji: 4.5 s).
LONGEST_RUN = 512
LETTERS = r"[\p{L}\p{M}]"
OTHERS = r"[^\p{L}\p{N}]"
# Aligned windows of half the limit: every run longer than LONGEST_RUN holds one whole, and in ordinary text
# each window's check fails within a few characters, so finding the runs costs next to nothing.
WINDOW = LONGEST_RUN // 2
# Per class: a whole window of it, a run of it forwards, and backwards ((?r): matched from the end).
CLASSES = [
    (regex.compile(f"{c}{{{WINDOW}}}"), regex.compile(f"{c}*"), regex.compile(f"(?r){c}*")) for c in (LETTERS, OTHERS)
]


def long_runs(text: str, longest: int = LONGEST_RUN) -> list[tuple[int, int]]:
    """The (start, end) spans of `text` that lie in runs longer than `longest`, in order, merged where they meet."""
    if len(text) <= longest:
        return []
    spans = []
    for whole, forward, backward in CLASSES:
        end = 0
        for window in range(0, len(text) - WINDOW + 1, WINDOW):
            if window < end or not whole.match(text, window):
                continue
            # The run began at most a window back: that window was not whole (or a run already took it).
            start = backward.match(text, max(0, window - WINDOW), window).start()
            end = forward.match(text, window).end()
            if end - start > longest:
                spans.append((start, end))
    return _merged(sorted(spans))


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in spans:
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(end, out[-1][1]))
        else:
            out.append((start, end))
    return out


def encode_text(enc: HarmonyEncoding, text: str, special: bool = False) -> list[int]:
    """o200k tokens of `text`, as `enc.encode` gives them where the text has no run longer than LONGEST_RUN.
    `special`: special tokens written as text (`<|start|>`) are those tokens; otherwise they are plain text."""
    if not special:
        return _ordinary(enc, text)
    tokens, start = [], 0
    for m in _specials(enc).finditer(text):
        tokens += _ordinary(enc, text[start : m.start()]) + enc.encode(m.group(), allowed_special={m.group()})
        start = m.end()
    return tokens + _ordinary(enc, text[start:])


def _ordinary(enc: HarmonyEncoding, text: str) -> list[int]:
    tokens, start = [], 0
    for run_start, run_end in long_runs(text):
        tokens += enc.encode(text[start:run_start], disallowed_special=())
        for chunk in range(run_start, run_end, LONGEST_RUN):
            tokens += enc.encode(text[chunk : min(chunk + LONGEST_RUN, run_end)], disallowed_special=())
        start = run_end
    return tokens + enc.encode(text[start:], disallowed_special=())


@functools.cache
def _specials(enc: HarmonyEncoding) -> re.Pattern:
    return re.compile("|".join(map(re.escape, sorted(enc.special_tokens_set, key=len, reverse=True))))
