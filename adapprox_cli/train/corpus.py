"""A small English-like text the project generates itself, so no data set is ever downloaded.

The text comes from a probabilistic grammar with a fixed vocabulary. It has the kinds of
structure a character-level model can pick up in a few hundred steps (spelling, word order,
capitals after a full stop) and some that reach further: subject-verb agreement across a
relative clause, quotes and parentheses that must be closed, answers that agree with their
question, counting runs and correct sums such as ``12 + 7 = 19``.

Everything is drawn from one ``random.Random(seed)`` instance: Python documents its
Mersenne Twister and ``random()``/``randrange`` outputs as reproducible across versions, so a
seed names the same text on every machine.
"""

from __future__ import annotations

import random

NAMES = ("Anna", "Ben", "Clara", "David", "Eva", "Felix", "Grace", "Hugo", "Iris", "Jonas", "Kira", "Leo")
# singular -> plural, so agreement has to be learned from the noun, not from a trailing "s" alone.
NOUNS = {
    "cat": "cats",
    "dog": "dogs",
    "bird": "birds",
    "child": "children",
    "teacher": "teachers",
    "farmer": "farmers",
    "box": "boxes",
    "river": "rivers",
    "house": "houses",
    "tree": "trees",
    "city": "cities",
    "letter": "letters",
    "ship": "ships",
    "garden": "gardens",
    "lamp": "lamps",
    "book": "books",
}
ADJECTIVES = ("small", "old", "red", "quiet", "bright", "green", "heavy", "happy", "cold", "tall", "young")
# (plural/base form, third-person singular present, past)
TRANSITIVE_VERBS = (
    ("see", "sees", "saw"),
    ("find", "finds", "found"),
    ("carry", "carries", "carried"),
    ("watch", "watches", "watched"),
    ("follow", "follows", "followed"),
    ("build", "builds", "built"),
    ("open", "opens", "opened"),
    ("paint", "paints", "painted"),
)
INTRANSITIVE_VERBS = (
    ("run", "runs", "ran"),
    ("sleep", "sleeps", "slept"),
    ("sing", "sings", "sang"),
    ("wait", "waits", "waited"),
    ("fall", "falls", "fell"),
)
PREPOSITIONS = ("near", "under", "behind", "beside", "across", "in", "over")
ADVERBS = ("slowly", "quickly", "often", "never", "always", "again", "quietly")
COUNT_WORDS = ("two", "three", "four", "many", "some")
CONJUNCTIONS = ("and", "but", "because", "so", "while")


def _noun_phrase(rng: random.Random, plural: bool, allow_name: bool = True) -> str:
    if not plural and allow_name and rng.random() < 0.25:
        return rng.choice(NAMES)
    noun = rng.choice(tuple(NOUNS))
    words = [NOUNS[noun] if plural else noun]
    if rng.random() < 0.4:
        words.insert(0, rng.choice(ADJECTIVES))
    if allow_name and rng.random() < 0.1:  # a possessive replaces the determiner: "Anna's old dog"
        return " ".join([rng.choice(NAMES) + "'s", *words])
    if plural:
        determiner = rng.choice(("the", *COUNT_WORDS))
    else:
        determiner = rng.choice(("the", "the", "a", "this"))
        # "a" must become "an" before a vowel: a small rule that reaches one word ahead.
        if determiner == "a" and words[0][0] in "aeiou":
            determiner = "an"
    return " ".join([determiner, *words])


def _verb(forms: tuple[str, str, str], plural: bool, past: bool) -> str:
    if past:
        return forms[2]
    return forms[0] if plural else forms[1]


def _clause(rng: random.Random, past: bool) -> str:
    """Subject, optional relative clause, verb agreeing with the subject, object, place."""
    plural = rng.random() < 0.4
    words = [_noun_phrase(rng, plural)]
    if rng.random() < 0.3 and words[0] not in NAMES:
        # The relative clause sits between subject and verb, so the agreement spans it.
        if rng.random() < 0.5:  # "the cats that sleep ...": the inner verb agrees with the subject
            words.append("that " + _verb(rng.choice(INTRANSITIVE_VERBS), plural, past))
        else:  # "the cat that two dogs see ...": the inner verb has its own subject
            inner_plural = rng.random() < 0.5
            inner_subject = _noun_phrase(rng, inner_plural)
            words.append(f"that {inner_subject} {_verb(rng.choice(TRANSITIVE_VERBS), inner_plural, past)}")
    if rng.random() < 0.2:
        words.append(rng.choice(ADVERBS))
    if rng.random() < 0.6:
        words.append(_verb(rng.choice(TRANSITIVE_VERBS), plural, past))
        words.append(_noun_phrase(rng, rng.random() < 0.3))
    else:
        words.append(_verb(rng.choice(INTRANSITIVE_VERBS), plural, past))
    if rng.random() < 0.4:
        words.append(rng.choice(PREPOSITIONS) + " " + _noun_phrase(rng, False, allow_name=False))
    return " ".join(words)


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _statement(rng: random.Random) -> str:
    past = rng.random() < 0.3
    text = _clause(rng, past)
    if rng.random() < 0.3:
        text += ", " + rng.choice(CONJUNCTIONS) + " " + _clause(rng, past)
    elif rng.random() < 0.05:
        text += "; " + _clause(rng, past)
    if rng.random() < 0.15:
        # A parenthetical remark: the model has to remember that a bracket is open.
        aside = rng.choice((f"see page {rng.randrange(1, 300)}", "as always", _noun_phrase(rng, False)))
        text += f" ({aside})"
    return _capitalize(text) + "."


def _question_and_answer(rng: random.Random) -> str:
    plural = rng.random() < 0.4
    subject = _noun_phrase(rng, plural)
    verb = rng.choice(TRANSITIVE_VERBS)[0]
    question = f"{'Do' if plural else 'Does'} {subject} {verb} {_noun_phrase(rng, rng.random() < 0.3)}?"
    # The answer agrees with the question's subject several words back.
    if plural:
        pronoun, auxiliary = "they", "do"
    elif subject in NAMES:
        pronoun, auxiliary = rng.choice(("he", "she")), "does"
    else:
        pronoun, auxiliary = "it", "does"
    answer = f"Yes, {pronoun} {auxiliary}." if rng.random() < 0.5 else f"No, {pronoun} {auxiliary} not."
    return f"{question} {answer}"


def _speech(rng: random.Random) -> str:
    speaker = rng.choice(NAMES)
    said = rng.choice(("said", "asked", "wrote", "called"))
    quoted = _capitalize(_clause(rng, past=False))
    if rng.random() < 0.15:
        return f'"{quoted}!" {said} {speaker}.'
    if rng.random() < 0.5:
        return f'{speaker} {said}, "{quoted}."'
    return f'"{quoted}," {said} {speaker}.'


def _arithmetic_line(rng: random.Random) -> str:
    operator = rng.choice("+-*")
    if operator == "*":
        a, b = rng.randrange(2, 13), rng.randrange(2, 13)
        return f"{a} * {b} = {a * b}"
    a, b = rng.randrange(0, 100), rng.randrange(0, 100)
    if operator == "-":
        a, b = max(a, b), min(a, b)
        return f"{a} - {b} = {a - b}"
    return f"{a} + {b} = {a + b}"


def _counting_line(rng: random.Random) -> str:
    start = rng.randrange(0, 90)
    numbers = ", ".join(str(start + i) for i in range(rng.randrange(4, 9)))
    return f"{rng.choice(NAMES)} counts: {numbers}."


def _paragraph(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.15:
        return "Sums:\n" + "\n".join(_arithmetic_line(rng) for _ in range(rng.randrange(3, 7)))
    sentences = []
    for _ in range(rng.randrange(2, 7)):
        pick = rng.random()
        if pick < 0.55:
            sentences.append(_statement(rng))
        elif pick < 0.7:
            sentences.append(_question_and_answer(rng))
        elif pick < 0.9:
            sentences.append(_speech(rng))
        else:
            sentences.append(_counting_line(rng))
    return " ".join(sentences)


def generate_corpus(n_chars: int, seed: int) -> str:
    """Return exactly ``n_chars`` characters of generated text; the same seed gives the same text.

    Paragraphs are separated by a blank line, as in most plain-text corpora.
    """
    if n_chars < 0:
        raise ValueError(f"Invalid n_chars: {n_chars} (must be >= 0)")
    rng = random.Random(seed)
    paragraphs: list[str] = []
    length = 0
    while length < n_chars:
        paragraphs.append(_paragraph(rng))
        length += len(paragraphs[-1]) + 2
    return "\n\n".join(paragraphs)[:n_chars]
