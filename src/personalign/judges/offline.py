"""Offline judges: pairwise verdicts from measurable properties of the text.

No network and no large model: each supported side has a deterministic score (higher = more of that
side), and a pair is won by the larger score, or tied when the scores differ by less than the side's
margin. The same score serves as a scalar reward (:func:`side_score`).

What each side measures, and why:

* **P1A elementary / P1B expert** share one *expertise level* (:func:`expertise_level`), about a
  school grade: the Flesch-Kincaid grade from words per sentence and syllables per word (syllables
  from textstat's CMU-dictionary counter), plus the share of rare words (wordfreq Zipf frequency
  below 3, i.e. under one use per million words: jargon such as "eigenvalue", "thylakoid") and of
  technical notation (formulas, chemical formulas, acronyms, "i.e."/"et al."). Readability formulas
  alone miss short jargon-dense sentences; rarity alone misses long abstract prose, so both count.
  P1A = minus the level, P1B = the level.
* **P2A concise**: brevity, ``-log2`` of an *effective length* (words, plus a charge for each
  filler or hedging phrase and for every word inside a repeated phrase), so a padded reply is
  longer than it looks. Below 8 words length stops paying, so the reward cannot be maximised by
  answering with one word; a reply that answers nothing ("I'm not sure", "Sorry, I can't help")
  pays a penalty, and covering the question's content words earns a small bonus.
* **P2B informative**: information content, ``log2`` of the number of *distinct* content words
  (stop words and filler excluded, plurals folded) plus distinct numbers (dates, quantities), with
  a small bonus for explanatory structure ("because", "for example", "such as") and a penalty
  for the share of repeated phrases. Repeating text adds no new distinct words, so padding does
  not read as information.
* **P3A friendly/witty**: VADER sentiment (mean over sentences), exclamations, emoji and
  emoticons, laughter ("haha", "lol", "chuckles"), friendly and playful phrases ("my friend",
  "you've got this", "fun fact"), minus rude cues, questions thrown back at the asker
  ("Really?") and clipped statements ("There.").
* **P3B unfriendly**: rude or dismissive cues (insults, angry emoji, "obviously", "figure it out
  yourself", "look it up", "not my problem", "did you really ..."), thrown-back questions and
  clipped statements, minus politeness and warmth markers ("please", "happy to help", "hope this
  helps", friendly emoji, exclamations) and minus VADER sentiment. A neutral reply therefore beats
  a warm one, and a dismissive one beats both.

P3C sassy and P3D sarcastic are not measured: sarcasm says the opposite of what it means, and
surface cues cannot tell it from sincerity or plain rudeness, so :class:`OfflineJudge` raises
:class:`UnsupportedSideError` rather than guess.

A response with no word at all (empty, whitespace, punctuation or emoji only) gets the side's
lowest score, below any real reply. Markdown markup (headers, bullets, emphasis, code fences) is
stripped before measuring; list items and lines count as sentences.

Known limits (see docs/judges.md): no measure checks that a reply is correct or on topic beyond
word overlap with the prompt; the lexicons are English-only; the cue lists can be gamed by an RL
policy that learns to insert cue words, so use these scores as rewards only with a KL penalty and
check samples by eye.

Why one file of about 480 lines: one score per side, each a few lines with its margin and its
explanation, and the judge over them; a file per side would scatter the margins that calibrate them.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from personalign.errors import PreferenceError
from personalign.judges.base import PairwiseJudge, UnsupportedSideError, Verdict
from personalign.preferences import BUILTIN_SIDES, default_space

__all__ = [
    "DEFAULT_MARGINS",
    "SUPPORTED_SIDES",
    "OfflineJudge",
    "TextFeatures",
    "analyze",
    "expertise_level",
    "question_coverage",
    "side_score",
]

_INSTALL_HINT = "the offline judges need the 'judges' extra: pip install 'personalign[judges]'"


# -- optional libraries, imported on first use ------------------------------------------------


@functools.lru_cache(maxsize=1)
def _vader() -> Any:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from exc
    return SentimentIntensityAnalyzer()


@functools.lru_cache(maxsize=200_000)
def _syllables(word: str) -> int:
    try:
        import textstat
    except ImportError as exc:  # pragma: no cover
        raise ImportError(_INSTALL_HINT) from exc
    return max(1, textstat.syllable_count(word))


@functools.lru_cache(maxsize=200_000)
def _zipf(word: str) -> float:
    """Zipf frequency: log10 of uses per billion words; 7 for "the", 3 for one per million, 0 unseen."""
    try:
        from wordfreq import zipf_frequency
    except ImportError as exc:  # pragma: no cover
        raise ImportError(_INSTALL_HINT) from exc
    return zipf_frequency(word, "en")


# -- text features ----------------------------------------------------------------------------

_CODE_FENCE = re.compile(r"```[^\n]*")
_MD_LINE_PREFIX = re.compile(r"^\s{0,12}(?:#{1,6}\s+|>\s*|[-*+•]\s+|\d{1,3}[.)]\s+)", re.MULTILINE)
_MD_EMPHASIS = re.compile(r"(\*\*|__|\*|`|~~)")
_MD_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+|\n+")
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
# Technical notation: chemical/variant names (Ca2+, H2O, Abeta42), formulas (x^2, a = b), Greek
# letters, acronyms (RNA, CHSH), scholarly abbreviations.
_NOTATION = re.compile(
    r"\b(?=[A-Za-z]*\d)(?=\d*[A-Za-z])[A-Za-z0-9]{2,}[+-]?(?![\w])"
    r"|[\^=<>≤≥±×∑∫√∂∆∇]"
    r"|[α-ωΑ-Ω]"
    r"|\b[A-Z]{2,}[a-z]?\b"
    r"|\b(?:i\.e\.|e\.g\.|et al\.|cf\.|viz\.)"
)
# Emoji and pictographs, plus the common text emoticons. Angry, eye-rolling and face-palm emoji
# are rude cues instead.
_ANGRY_EMOJI = "\U0001f620\U0001f621\U0001f624\U0001f92c\U0001f644\U0001f926\U0001f612\U0001f595\U0001f4a2"
_RUDE_EMOJI = re.compile(f"[{_ANGRY_EMOJI}]")
_EMOJI = re.compile(
    f"(?![{_ANGRY_EMOJI}])"
    r"[\U0001F300-\U0001FAFF\u2600-\u27BF\u2B50\u2B55\u2764\U0001F000-\U0001F2FF]"
    r"|(?<!\w)(?:[:;=]-?[)(DPp]|<3|\^_\^|xD)(?!\w)"
)


@dataclass(frozen=True)
class TextFeatures:
    """What the side scores read from one response, computed once per response."""

    text: str  # markdown stripped, NFKC-normalised, original case
    words: tuple[str, ...]  # lowercase word tokens (letters, inner apostrophes)
    numbers: tuple[str, ...]
    sentences: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not self.words and not self.numbers


def analyze(response: str) -> TextFeatures:
    """Normalise a response and split it into words, numbers and sentences."""
    text = unicodedata.normalize("NFKC", response or "").replace("\r", "")
    text = text.replace("’", "'").replace("‘", "'")
    text = _CODE_FENCE.sub("\n", text)
    text = _MD_LINK.sub(r"\1", text)
    text = _MD_LINE_PREFIX.sub("", text)
    text = _MD_EMPHASIS.sub("", text)
    sentences = tuple(s.strip() for s in _SENTENCE_END.split(text) if _WORD.search(s) or _NUMBER.search(s))
    words = tuple(w.lower() for w in _WORD.findall(text))
    numbers = tuple(_NUMBER.findall(text))
    return TextFeatures(text=text.strip(), words=words, numbers=numbers, sentences=sentences)


# Function words and filler: they carry no information of their own.
_STOPWORD_TEXT = """
a about above after again against all also am an and any are aren't as at be because been before
being below between both but by can can't cannot could couldn't did didn't do does doesn't doing
don't down during each few for from further get gets got had hadn't has hasn't have haven't having
he he's her here here's hers herself him himself his how how's i i'd i'll i'm i've if in into is
isn't it it's its itself just let let's me more most mustn't my myself no nor not of off on once
only or other ought our ours ourselves out over own same shan't she she's should shouldn't so some
such than that that's the their theirs them themselves then there there's these they they'd they'll
they're they've this those through to too under until up upon us very was wasn't we we'd we'll we're
we've were weren't what what's when when's where where's which while who who's whom why why's will
with won't would wouldn't you you'd you'll you're you've your yours yourself yourselves yes yeah ok
okay oh well really basically actually literally honestly totally simply quite rather pretty kind
sort lot lots thing things stuff something anything everything way ways many much even still maybe
perhaps one ones make makes made like just good great nice important definitely certainly probably
"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())

# Phrases that lengthen a reply without informing: hedges, throat-clearing, sign-offs.
_FILLER = re.compile(
    r"\b(?:great|good|excellent|interesting) question"
    r"|\b(?:basically|essentially|actually|honestly|literally|obviously|generally speaking)\b"
    r"|\bit(?:'s| is) (?:important|worth|interesting) (?:to note|noting|mentioning|keeping in mind)"
    r"|\b(?:i hope (?:this|that) (?:helps|answers|clears)|hope (?:this|that) helps)"
    r"|\blet me know if\b|\bfeel free to\b|\bat the end of the day\b|\bin a nutshell\b"
    r"|\bto sum (?:it )?(?:all )?up\b|\bin conclusion\b|\bin other words\b|\bas i said\b"
    r"|\b(?:kind|sort) of\b|\byou know\b|\bi mean\b|\bwhen you think about it\b"
    r"|\bit (?:really )?depends\b"
    r"|\bthere are (?:so |many |a lot of )*(?:different )?(?:ways|factors|things)\b"
    r"|\b(?:might|may|could) (?:possibly|potentially|perhaps)\b|\bif you want(?: to)?\b"
    r"|\bthat being said\b|\bthat said\b|\bneedless to say\b|\bfirst of all\b"
)

# A reply that answers nothing: a refusal, a shrug, or a request to ask again.
_NON_ANSWER = re.compile(
    r"\b(?:i'm|i am) (?:not (?:completely |entirely |really )?sure|unable to|afraid i can't)"
    r"|\bi (?:can't|cannot|can not|won't) (?:help|answer|assist|provide)"
    r"|\bi don't know\b|\bas an ai\b|\bcould you (?:please )?(?:clarify|provide more)"
    r"|\bsorry, (?:but )?i\b|\btell me (?:a bit )?more\b|\bi'd be happy to help you figure\b"
)

_EXPLANATORY = re.compile(
    r"\b(?:because|since|therefore|thus|so that|which means|this means|due to|as a result"
    r"|for example|for instance|such as|e\.g\.|including|in contrast|whereas|however|originally"
    r"|first|second|third|finally|then|after|before|during|known as|called|defined as)\b"
)

_LAUGH = re.compile(r"\b(?:a?ha(?:ha)+h?|he(?:he)+|lol|lmao|rofl|hah|chuckl\w*|giggl\w*)\b")
_FRIENDLY = re.compile(
    r"\b(?:my friend|buddy|pal|friend|you(?:'ve| have)? got this|you can do (?:it|this)|trust me|fun fact"
    r"|pro tip|spoiler|real talk|no worries|don't worry|woo+hoo+|yay|ooh+|aww+|oops|oof|boom|cheers"
    r"|congrats|congratulations|love (?:that|it|this)|you're (?:welcome|awesome|amazing)"
    r"|good luck|have fun|enjoy|happy to|glad|hey|hooray|just kidding|jk)\b"
)
_RUDE = re.compile(
    r"\b(?:stupid|idiot\w*|dumb\w*|moron\w*|jerk|loser|lazy|clueless|pathetic|incompetent|ignorant"
    r"|useless|ridiculous|duh|ugh|meh|whatever|seriously|obviously|shut up|annoying|bother(?:ing)? me"
    r"|waste of (?:my )?time"
    r"|wasting (?:my|your) time|not rocket science|not (?:that |so )?(?:hard|difficult|complicated)"
    r"|(?:everybody|everyone|anyone) knows|look it up|google it|read the manual|figure it out"
    r"|(?:do|write|find|look|figure) it (?:out )?yourself|deal with it|get over it"
    r"|not my (?:problem|job)|your problem|(?:couldn't|could not|don't|do not) care|leave me alone"
    r"|happy now|are you kidding|did you (?:really|seriously|even)|should have|i'm not your"
    r"|spoon-?feed\w*|hold your hand|basic stuff|stop (?:asking|whining|complaining|wasting)"
    r"|just do it|next time|i guess|if you must)\b"
)
_POLITE = re.compile(
    r"\b(?:please|thank(?:s| you)|happy to|glad to|hope (?:this|that) helps|of course|absolutely"
    r"|sure|no problem|great question|good question|feel free|enjoy|you've got this|i'm (?:really )?sorry"
    r"|congrat\w*|welcome|don't worry|good luck|let me know|i'd be happy|wonderful|lovely)\b"
)
# A question thrown back at the asker ("Really?", "Did you even try?") rather than a tag question
# ("..., right?") or an offer of more help ("Would you like ...?").
_TAG_OR_OFFER = re.compile(
    r"(?:\b(?:right|huh|eh|no|isn't it|aren't they|don't you think|you know|yes|okay|ok)\?$)"
    r"|\b(?:would you like|do you want|want me to|shall i|should i|can i|could i|may i|how about|what about"
    r"|who doesn't|anything else|any other|does that help|make sense)\b"
)


def _count(pattern: re.Pattern[str], text: str) -> int:
    return len(pattern.findall(text.lower()))


def _fold(word: str) -> str:
    """Crude plural folding so "tree" and "trees" are one content word."""
    word = word.removesuffix("'s")
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _repeated_share(words: Sequence[str], n: int = 3) -> float:
    """Share of word n-grams that already occurred earlier in the reply (0 for fresh text)."""
    if len(words) < n + 1:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    seen: set[tuple[str, ...]] = set()
    repeated = 0
    for g in grams:
        repeated += g in seen
        seen.add(g)
    return repeated / len(grams)


def _content_words(words: Sequence[str]) -> list[str]:
    return [_fold(w) for w in words if len(w) > 2 and w not in _STOPWORDS]


def _sentiment(f: TextFeatures) -> float:
    """Mean VADER compound over sentences, in [-1, 1]; per sentence so long texts do not saturate."""
    vader = _vader()
    scores = [vader.polarity_scores(s)["compound"] for s in f.sentences[:200]]
    return sum(scores) / len(scores) if scores else 0.0


def _prompt_content(prompt: str) -> set[str]:
    # The appended preference prompts are instructions to the policy, not the question's topic.
    for side in BUILTIN_SIDES:
        prompt = prompt.replace(side.prompt, " ")
    return set(_content_words(analyze(prompt).words))


def question_coverage(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Per answer, the share of its question's content words (stopwords dropped, plurals folded, the
    built-in preference prompts removed) that the answer uses: 1 when it names everything asked about,
    0 when it names none of it or the question has no content word. A lexical measure of staying on the
    question, with no model; the concise side's score rewards the same coverage."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    out = []
    for prompt, response in zip(prompts, responses):
        asked = _prompt_content(prompt)
        out.append(len(asked & set(_content_words(analyze(response).words))) / len(asked) if asked else 0.0)
    return out


# -- side scores ------------------------------------------------------------------------------

# Caps keep one pathological reply (a 300-word run-on sentence from a looping sampler) from
# dominating a reward scale; empty replies score below the cap.
_MAX_WORDS_PER_SENTENCE = 40.0
_MAX_LEVEL = 30.0


def expertise_level(f: TextFeatures) -> float:
    """About a school grade: readability grade plus rare-word and notation shares, in [0, 30].

    ``fk``: Flesch-Kincaid grade, 0.39 * words/sentence + 11.8 * syllables/word - 15.59.
    ``rare``: share of word tokens with Zipf frequency < 3 (jargon); ``notation``: formulas,
    acronyms and the like per word. Each adds 20 x its share: 1 rare word (or 1 notation) in 10
    adds 2 grades.
    """
    if f.empty:
        return 0.0
    n = len(f.words) or 1
    wps = min(n / max(1, len(f.sentences)), _MAX_WORDS_PER_SENTENCE)
    spw = sum(_syllables(w) for w in f.words) / n
    fk = 0.39 * wps + 11.8 * spw - 15.59
    rare = sum(_zipf(w) < 3.0 for w in f.words) / n
    notation = len(_NOTATION.findall(f.text)) / n
    level = fk + 20.0 * rare + 20.0 * notation
    return min(max(level, 0.0), _MAX_LEVEL)


def _elementary(prompt: str, f: TextFeatures) -> float:
    return -_MAX_LEVEL - 1.0 if f.empty else -expertise_level(f)


def _expert(prompt: str, f: TextFeatures) -> float:
    return -1.0 if f.empty else expertise_level(f)


def _concise(prompt: str, f: TextFeatures) -> float:
    if f.empty:
        return -20.0
    n = len(f.words) + len(f.numbers)
    filler = _count(_FILLER, f.text)
    repeated = _repeated_share(f.words) * n
    effective = n + 4.0 * filler + repeated
    brevity = -math.log2(max(effective, 8.0))
    asked = _prompt_content(prompt)
    coverage = len(asked & set(_content_words(f.words))) / len(asked) if asked else 0.0
    non_answer = 2.0 * min(_count(_NON_ANSWER, f.text), 1)
    return brevity + 0.5 * coverage - non_answer


def _informative(prompt: str, f: TextFeatures) -> float:
    if f.empty:
        return -5.0
    distinct = len(set(_content_words(f.words))) + 0.5 * len(set(f.numbers))
    explanatory = len(set(_EXPLANATORY.findall(f.text.lower())))
    filler = _count(_FILLER, f.text)
    return (
        math.log2(1.0 + distinct)
        + 0.3 * math.log2(1.0 + explanatory)
        - 4.0 * _repeated_share(f.words)
        - 0.2 * filler
    )


def _style_counts(f: TextFeatures) -> dict[str, float]:
    lower = f.text.lower()
    return {
        "sentiment": _sentiment(f),
        "exclaim": f.text.count("!"),
        "emoji": len(_EMOJI.findall(f.text)),
        "laugh": _count(_LAUGH, lower),
        "friendly": _count(_FRIENDLY, lower),
        "rude": _count(_RUDE, lower) + len(_RUDE_EMOJI.findall(f.text)),
        "polite": _count(_POLITE, lower),
        "rhetorical": sum(s.endswith("?") and not _TAG_OR_OFFER.search(s.lower()) for s in f.sentences),
        # Clipped statements ("Train it." "There.") read as curt; exclamations ("Yay!") and
        # unpunctuated list items do not.
        "terse": sum(len(_WORD.findall(s)) <= 3 and s.endswith(".") for s in f.sentences)
        / max(1, len(f.sentences)),
    }


def _friendly(prompt: str, f: TextFeatures) -> float:
    if f.empty:
        return -10.0
    c = _style_counts(f)
    return (
        1.5 * c["sentiment"]
        + 0.8 * math.log1p(c["exclaim"])
        + 1.0 * math.log1p(c["emoji"] + c["laugh"])
        + 1.0 * math.log1p(c["friendly"])
        - 1.5 * math.log1p(c["rude"])
        - 0.5 * math.log1p(c["rhetorical"])
        - 1.0 * c["terse"]
    )


def _unfriendly(prompt: str, f: TextFeatures) -> float:
    if f.empty:
        return -10.0
    c = _style_counts(f)
    return (
        2.0 * math.log1p(c["rude"])
        + 0.8 * math.log1p(c["rhetorical"])
        + 1.5 * c["terse"]
        - 1.0 * math.log1p(c["polite"] + c["friendly"] + c["emoji"] + c["laugh"])
        - 0.3 * math.log1p(c["exclaim"])
        - 1.0 * c["sentiment"]
    )


_SCORERS: dict[str, Callable[[str, TextFeatures], float]] = {
    "P1A": _elementary,
    "P1B": _expert,
    "P2A": _concise,
    "P2B": _informative,
    "P3A": _friendly,
    "P3B": _unfriendly,
}
SUPPORTED_SIDES: tuple[str, ...] = tuple(_SCORERS)

# Score differences below these count as ties: one school grade (P1), about a fifth in effective
# length (P2A, log2 units), about a tenth in distinct content (P2B), one weak style cue (P3).
DEFAULT_MARGINS: Mapping[str, float] = MappingProxyType(
    {"P1A": 1.0, "P1B": 1.0, "P2A": 0.25, "P2B": 0.15, "P3A": 0.3, "P3B": 0.3}
)


def _resolve_side(side: str, judge: str = "offline") -> str:
    """Side id for ``side`` (id, ``1A``, name or alias); unknown or unmeasurable sides raise."""
    try:
        sid = default_space().resolve(side)
    except PreferenceError:
        raise PreferenceError(
            f"unknown side {side!r} for the {judge} judge; it measures {', '.join(SUPPORTED_SIDES)} "
            f"(valid built-in sides: {default_space().valid_sides_text()}). "
            "Sides from your own dimensions file need the LLM or human-label judge."
        ) from None
    if sid not in _SCORERS:
        raise UnsupportedSideError(sid, judge, SUPPORTED_SIDES)
    return sid


def side_score(side: str, prompt: str, response: str) -> float:
    """How strongly ``response`` embodies ``side`` as an answer to ``prompt`` (higher = more).

    Deterministic, finite, and comparable across responses to the same prompt; see the module
    docstring for what each side measures. Raises :class:`UnsupportedSideError` for P3C and P3D.
    """
    sid = _resolve_side(side)
    return float(_SCORERS[sid](prompt, analyze(response)))


class OfflineJudge(PairwiseJudge):
    """Pairwise judge from :func:`side_score`: the larger score wins, a gap under the margin ties."""

    name = "offline"

    def __init__(self, margins: Mapping[str, float] | None = None):
        merged = dict(DEFAULT_MARGINS)
        for key, value in (margins or {}).items():
            sid = _resolve_side(key, self.name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise PreferenceError(f"margin for {sid} must be a finite number >= 0, got {value!r}")
            merged[sid] = float(value)
        self.margins: Mapping[str, float] = merged
        self.supported_sides: tuple[str, ...] = SUPPORTED_SIDES

    def score_response(self, side: str, prompt: str, response: str) -> float:
        """The scalar behind the verdicts, for use as a reward."""
        return side_score(side, prompt, response)

    def judge(self, prompt: str, a: str, b: str, side: str) -> Verdict:
        sid = _resolve_side(side, self.name)
        scorer = _SCORERS[sid]
        diff = scorer(prompt, analyze(a)) - scorer(prompt, analyze(b))
        if abs(diff) < self.margins[sid]:
            return "tie"
        return "a" if diff > 0 else "b"

    def judge_many(self, items: Sequence[tuple[str, str, str]], side: str) -> list[Verdict]:
        _resolve_side(side, self.name)  # fail before scoring anything
        return [self.judge(prompt, a, b, side) for prompt, a, b in items]
