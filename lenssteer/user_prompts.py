"""Prompts that look like what users type, written for this project in each language.

The language-fidelity task asks the model something in language X and checks that the answer is in
X. One instruction ("explain this verse") is easy to overfit to, so prompts come in several kinds:
an explanation, a one-sentence summary, a rewrite in plain modern X (a same-language "translation"),
a question about the passage, and a title with a reason. Every wrapper below was written for its
language (not machine-generated from English); the material they wrap is public-domain Bible text
(:mod:`lenssteer.data`), so nothing here has a licence question.

``OPEN_QUESTION_INSTRUCTIONS`` ask an MMLU question openly (without its options); such a prompt has
a known answer, so the comparison measures correctness beside fidelity (:func:`mentions_only`).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "OPEN_QUESTION_INSTRUCTIONS",
    "PROMPT_KINDS",
    "PROMPT_WRAPPERS",
    "distinctive_options",
    "mentions_only",
]

# kind -> {language: instruction}; "explain" is lenssteer.task_registry.FIDELITY_INSTRUCTIONS.
PROMPT_WRAPPERS: dict[str, dict[str, str]] = {
    "summarise": {
        "en": "Summarise this passage in one sentence:",
        "fr": "Résume ce passage en une phrase :",
        "es": "Resume este pasaje en una frase:",
        "it": "Riassumi questo passo in una frase:",
        "de": "Fasse diese Stelle in einem Satz zusammen:",
        "ru": "Перескажи этот отрывок одним предложением:",
        "ar": "لخّص هذا المقطع في جملة واحدة:",
        "fa": "این بخش را در یک جمله خلاصه کن:",
        "vi": "Hãy tóm tắt đoạn văn này trong một câu:",
        "tl": "Ibuod ang talatang ito sa isang pangungusap:",
    },
    "rewrite": {
        "en": "Rewrite this passage in plain, modern English:",
        "fr": "Réécris ce passage en français simple et moderne :",
        "es": "Reescribe este pasaje en un español sencillo y moderno:",
        "it": "Riscrivi questo passo in un italiano semplice e moderno:",
        "de": "Schreibe diese Stelle in einfachem, modernem Deutsch neu:",
        "ru": "Перепиши этот отрывок простым современным русским языком:",
        "ar": "أعد كتابة هذا المقطع بلغة عربية بسيطة ومعاصرة:",
        "fa": "این بخش را به فارسی ساده و امروزی بازنویسی کن:",
        "vi": "Hãy viết lại đoạn văn này bằng tiếng Việt hiện đại, dễ hiểu:",
        "tl": "Isulat muli ang talatang ito sa simple at makabagong Tagalog:",
    },
    "question": {
        "en": "What is the main message of this passage?",
        "fr": "Quel est le message principal de ce passage ?",
        "es": "¿Cuál es el mensaje principal de este pasaje?",
        "it": "Qual è il messaggio principale di questo passo?",
        "de": "Was ist die Hauptaussage dieser Stelle?",
        "ru": "В чём главная мысль этого отрывка?",
        "ar": "ما الرسالة الرئيسية لهذا المقطع؟",
        "fa": "پیام اصلی این بخش چیست؟",
        "vi": "Thông điệp chính của đoạn văn này là gì?",
        "tl": "Ano ang pangunahing mensahe ng talatang ito?",
    },
    "title": {
        "en": "Give this passage a short title and say why you chose it:",
        "fr": "Donne un titre court à ce passage et explique ton choix :",
        "es": "Ponle un título breve a este pasaje y explica por qué lo elegiste:",
        "it": "Dai a questo passo un titolo breve e spiega la tua scelta:",
        "de": "Gib dieser Stelle einen kurzen Titel und begründe deine Wahl:",
        "ru": "Придумай короткое название для этого отрывка и объясни свой выбор:",
        "ar": "اقترح عنوانًا قصيرًا لهذا المقطع واشرح سبب اختيارك:",
        "fa": "یک عنوان کوتاه برای این بخش پیشنهاد بده و دلیل انتخابت را توضیح بده:",
        "vi": "Hãy đặt một tiêu đề ngắn cho đoạn văn này và giải thích lý do bạn chọn:",
        "tl": "Bigyan ng maikling pamagat ang talatang ito at ipaliwanag kung bakit mo ito pinili:",
    },
}
PROMPT_KINDS = ("explain", *PROMPT_WRAPPERS)

OPEN_QUESTION_INSTRUCTIONS: dict[str, str] = {
    "en": "Answer this question in two or three sentences:",
    "de": "Beantworte diese Frage in zwei oder drei Sätzen:",
    "es": "Responde a esta pregunta en dos o tres frases:",
    "fr": "Réponds à cette question en deux ou trois phrases :",
    "hi": "इस प्रश्न का उत्तर दो या तीन वाक्यों में दो:",
    "it": "Rispondi a questa domanda in due o tre frasi:",
    "pt": "Responda a esta pergunta em duas ou três frases:",
    "th": "ตอบคำถามนี้ในสองหรือสามประโยค:",
}


def _normal(text: str) -> str:
    return " ".join(text.casefold().split())


def distinctive_options(choices: Sequence[str], min_chars: int = 3) -> bool:
    """Options that an answer can be checked against by mention: each at least ``min_chars``
    characters, all different, none contained in another."""
    options = [_normal(c) for c in choices]
    return (
        all(len(o) >= min_chars for o in options)
        and len(set(options)) == len(options)
        and not any(a in b for i, a in enumerate(options) for j, b in enumerate(options) if i != j)
    )


def mentions_only(answer: str, choices: Sequence[str], gold: int) -> bool:
    """True when ``answer`` mentions the gold option's text and no other option's text.

    A strict lower bound on correctness (a right answer in other words counts as wrong); it is the
    same rule for every system, so differences between systems remain meaningful.
    """
    text = _normal(answer)
    found = [i for i, choice in enumerate(choices) if _normal(choice) in text]
    return found == [gold]
