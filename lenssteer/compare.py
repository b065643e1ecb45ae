"""The side-by-side comparison: every system scored on identical items with identical settings.

A *system* is a way of running the one loaded model:

* ``base``: the model as it is;
* ``lens``: the model with a Lens steering adapter applied (:class:`lenssteer.adapter.SteeringAdapter`,
  removed again afterwards);
* ``xtransplant``: XTransplant from the central language (``en -> xx``): for each target-language
  item, the module output at the aligned central-language prompt's last token (source layer ``s``)
  replaces the one at the item's own last prompt token (target layer ``t``), on the prefill only
  (:mod:`lenssteer.transplant`). The pair is fixed, read per language from a
  ``selected_pairs.json`` of ``lenssteer transplant-grid``, or chosen per language in this run on
  dev items of ``mmlu-translated`` that are not among the scored ones. Central-language items are
  scored unpatched (there is nothing to borrow from), and the retrieval task does not apply (the
  donor would be the very text to retrieve);
* ``baseline``: a training-free edit from a language subspace (:mod:`lenssteer.baselines`).

One run loads the model once, prepares each task's items once (a deterministic sample, the same
ids in every language), then for each system in turn scores every task and language with the same
batch size, padding side, prompts and seeds, and writes the report (:func:`lenssteer.evaluate.
write_report`). ``run_comparison`` is the plain function; ``lenssteer compare`` is a thin CLI over it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lenssteer.evaluate import (
    LowerLayerReplay,
    ScoringRequest,
    detect_language,
    generate_greedy,
    loglikelihoods,
    strip_copied,
)
from lenssteer.extract import resolve_chat_template
from lenssteer.models import DEFAULT_MODEL, find_decoder_layers, model_identity, resolve_layers
from lenssteer.report import package_versions, write_report
from lenssteer.sampling import OverlapError, check_disjoint, sample_ids
from lenssteer.stats import Outcomes
from lenssteer.task_registry import (
    GenerationTask,
    MultipleChoiceTask,
    RetrievalTask,
    Task,
    TaskError,
    get_task,
)

__all__ = [
    "SYSTEM_KINDS",
    "CompareConfig",
    "CompareConfigError",
    "SystemConfig",
    "TaskConfig",
    "apply_overrides",
    "load_config",
    "run_comparison",
    "scored_item_ids",
]

SYSTEM_KINDS = ("base", "lens", "xtransplant", "baseline", "language-shift")


class CompareConfigError(ValueError):
    """A comparison config that cannot run (unknown key, missing setting, bad value)."""


# --------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class SystemConfig:
    """One system of the comparison (see the module docstring for the kinds)."""

    name: str
    kind: str = "base"
    # lens
    adapter: str | None = None
    # baseline
    subspace: str | None = None
    mode: str = "remove-specific"
    layers: str | list[int] | None = "top:2"
    strength: float = 1.0
    # xtransplant
    granularity: str = "ffn"
    source_layer: int | None = None
    target_layer: int | None = None
    pairs_file: str | None = None
    select_on_dev: int | None = None  # dev items per language for choosing the pair in this run
    select_mode: str = "target-first"
    select_task: str = "mmlu-translated"  # xtransplant: the task whose unscored items choose pairs
    # language-shift: candidate layers (``layers``: None = a quarter, half, three quarters up),
    # candidate strengths, and how many dev verses build the language means
    strengths: list[float] | None = None
    direction_items: int = 64
    criterion: str = "fidelity"  # or "likelihood" (lenssteer.language_shift)
    max_likelihood_drop: float = 0.05  # fidelity criterion: nats per byte below the unshifted

    def __post_init__(self) -> None:
        if self.kind not in SYSTEM_KINDS:
            raise CompareConfigError(
                f"system {self.name!r}: unknown kind {self.kind!r}; choose one of "
                f"{', '.join(SYSTEM_KINDS)}"
            )
        if self.kind == "lens" and not self.adapter:
            raise CompareConfigError(f"system {self.name!r} (lens) needs 'adapter' (a folder)")
        if self.kind == "language-shift":
            if self.layers == "top:2":  # the baselines' default means nothing here
                self.layers = None
            if self.direction_items < 2:
                raise CompareConfigError(
                    f"system {self.name!r}: direction_items must be >= 2, got {self.direction_items}"
                )
            if self.criterion not in ("likelihood", "fidelity"):
                raise CompareConfigError(
                    f"system {self.name!r}: criterion must be likelihood or fidelity, not "
                    f"{self.criterion!r}"
                )
        if self.kind == "baseline" and not self.subspace:
            raise CompareConfigError(f"system {self.name!r} (baseline) needs 'subspace' (a folder)")
        if self.kind == "xtransplant":
            fixed = self.source_layer is not None and self.target_layer is not None
            if (self.source_layer is None) != (self.target_layer is None):
                raise CompareConfigError(
                    f"system {self.name!r}: give both source_layer and target_layer"
                )
            if not (fixed or self.pairs_file or self.select_on_dev):
                raise CompareConfigError(
                    f"system {self.name!r} (xtransplant) needs a pair: source_layer + "
                    "target_layer, pairs_file (selected_pairs.json), or select_on_dev = N"
                )


@dataclass
class TaskConfig:
    """A task by built-in name (or ``file`` for a user task) with its item limit and settings."""

    name: str
    limit: int | None = None
    file: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompareConfig:
    """Everything a comparison run depends on; ``load_config`` reads it from TOML.

    Relative paths (adapters, subspaces, task files, ``out``) are relative to the working directory.
    ``limit`` caps every task's limit (for quick runs).
    """

    model: str = DEFAULT_MODEL
    languages: list[str] = field(default_factory=lambda: ["en", "de", "es", "fr", "it"])
    central_language: str = "en"
    tasks: list[TaskConfig] = field(default_factory=list)
    systems: list[SystemConfig] = field(default_factory=list)
    out: str = "runs/compare"
    limit: int | None = None
    seed: int = 0
    batch_size: int = 8
    padding_side: str = "left"
    dtype: str = "float32"
    reference_system: str = "base"
    bootstrap_resamples: int = 2000
    threads: int | None = None
    exclude_items: list[str] = field(default_factory=list)  # ids no system is scored on

    def validate(self) -> None:
        if not isinstance(self.languages, list) or not all(
            isinstance(code, str) for code in self.languages
        ):
            raise CompareConfigError(
                f'languages must be a list of codes, e.g. languages = ["en", "de"]; got '
                f"{self.languages!r}"
            )
        if self.central_language not in self.languages:
            raise CompareConfigError(
                f"central language {self.central_language!r} is not among languages "
                f"{self.languages}"
            )
        if len(set(self.languages)) != len(self.languages):
            raise CompareConfigError(f"a language is listed twice: {self.languages}")
        if not self.tasks:
            raise CompareConfigError("no tasks to run")
        if not self.systems:
            raise CompareConfigError("no systems to compare")
        names = [s.name for s in self.systems]
        if len(set(names)) != len(names):
            raise CompareConfigError(f"system names must be unique, got {names}")
        if self.reference_system not in names:
            raise CompareConfigError(
                f"reference system {self.reference_system!r} is not among the systems {names}"
            )
        if self.padding_side not in ("left", "right"):
            raise CompareConfigError(
                f"padding_side must be left or right, not {self.padding_side!r}"
            )
        if self.dtype not in ("float32", "bfloat16", "auto"):
            raise CompareConfigError(f"dtype must be float32, bfloat16 or auto, not {self.dtype!r}")
        if self.batch_size < 1:
            raise CompareConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not isinstance(self.exclude_items, list) or not all(
            isinstance(item_id, str) for item_id in self.exclude_items
        ):
            raise CompareConfigError(
                f"exclude_items must be a list of item ids, got {self.exclude_items!r}"[:200]
            )
        for task in self.tasks:
            if task.limit is not None and task.limit < 1:
                raise CompareConfigError(f"task {task.name!r}: limit must be >= 1")


def _only_known(data: Mapping[str, Any], cls: type, where: str) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CompareConfigError(
            f"{where}: unknown key(s) {unknown}; known: {', '.join(sorted(known))}"
        )
    return dict(data)


def config_from_dict(data: Mapping[str, Any], source: str = "config") -> CompareConfig:
    """Build a :class:`CompareConfig` from the TOML layout (``[tasks.NAME]``, ``[systems.NAME]``)."""
    data = dict(data)
    tasks = []
    for name, settings in dict(data.pop("tasks", {})).items():
        settings = dict(settings or {})
        limit = settings.pop("limit", None)
        file = settings.pop("file", None)
        tasks.append(TaskConfig(name=name, limit=limit, file=file, settings=settings))
    systems = []
    for name, settings in dict(data.pop("systems", {})).items():
        settings = _only_known(settings or {}, SystemConfig, f"{source}: [systems.{name}]")
        systems.append(SystemConfig(name=name, **settings))
    top = _only_known(data, CompareConfig, source)
    config = CompareConfig(**top, tasks=tasks, systems=systems)
    config.validate()
    return config


def load_config(path: str | Path) -> CompareConfig:
    """Read a comparison config from a TOML file (see ``recipes/compare_quickstart.toml``)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise CompareConfigError(f"cannot read config {path}: {error}") from error
    except tomllib.TOMLDecodeError as error:
        raise CompareConfigError(f"{path}: invalid TOML ({error})") from error
    return config_from_dict(data, str(path))


DEFAULT_TASKS = ("mmlu-translated", "bible-continuation", "bible-retrieval", "language-fidelity")


def subspace_representation(folder: str | Path) -> str | None:
    """The representation point a subspace folder was probed at (None if unreadable: whoever
    loads the subspace reports that)."""
    try:
        header = json.loads((Path(folder) / "subspace.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return header.get("representation", "residual") if isinstance(header, dict) else None


def apply_overrides(
    config: CompareConfig,
    *,
    model: str | None = None,
    dtype: str | None = None,
    limit: int | None = None,
    out: str | None = None,
    batch_size: int | None = None,
    padding_side: str | None = None,
    seed: int | None = None,
    threads: int | None = None,
    languages: Sequence[str] | None = None,
    central_language: str | None = None,
    tasks: Sequence[str] | None = None,
    systems: Sequence[str] | None = None,
    adapters: Sequence[str] = (),
    subspace: str | None = None,
    transplant: str | tuple[int, int] | None = None,
    transplant_pairs: str | None = None,
) -> CompareConfig:
    """``config`` with the command line's settings applied (``None``: keep the config's); what
    ``lenssteer compare``'s flags do, as a plain function. Changes ``config`` and returns it.

    ``tasks``: names of known tasks (the config's own settings kept) or ``.json``/``.jsonl`` files;
    without them and without configured tasks, the four built-in tasks. ``systems``: keep only
    the config's systems of these names (then the flags below add to them). Without configured
    systems, the base model. ``adapters``: the first replaces the config's first Lens adapter,
    the others add Lens systems (``lens``, ``lens-2``, ...). ``subspace``: adds the remove-specific
    baseline (at the last layer for a ``final_norm`` subspace, else the top two layers).
    ``transplant``: a fixed ``"SOURCE,TARGET"`` pair (or tuple) adds ``xtransplant``;
    ``transplant_pairs``: a ``selected_pairs.json`` adds ``xtransplant-selected``.
    """
    settings = {
        "model": model,
        "dtype": dtype,
        "limit": limit,
        "out": out,
        "batch_size": batch_size,
        "padding_side": padding_side,
        "seed": seed,
        "threads": threads,
        "central_language": central_language,
    }
    for key, value in settings.items():
        if value is not None:
            setattr(config, key, value)
    if languages:
        config.languages = list(languages)
    if tasks:
        known = {task.name: task for task in config.tasks}
        config.tasks = [
            known.get(name)
            or (
                TaskConfig(name=Path(name).stem, file=name)
                if name.endswith((".json", ".jsonl"))
                else TaskConfig(name)
            )
            for name in tasks
        ]
    elif not config.tasks:
        config.tasks = [TaskConfig(name) for name in DEFAULT_TASKS]
    if systems:
        unknown = sorted(set(systems) - {system.name for system in config.systems})
        if unknown:
            raise CompareConfigError(
                f"--systems names {', '.join(unknown)}, which the config does not have (it has "
                f"{', '.join(system.name for system in config.systems) or 'none'})"
            )
        config.systems = [system for system in config.systems if system.name in systems]
    if not config.systems:
        config.systems = [SystemConfig("base")]
    adapters = list(adapters)
    configured = [system for system in config.systems if system.kind == "lens"]
    if adapters and configured:  # the first replaces the config's (first) Lens adapter
        configured[0].adapter = adapters.pop(0)
    names = {system.name for system in config.systems}
    for adapter in adapters:
        name = next(n for n in ["lens", *(f"lens-{k}" for k in range(2, 99))] if n not in names)
        names.add(name)
        config.systems.append(SystemConfig(name, kind="lens", adapter=adapter))
    if subspace:  # a final_norm subspace exists at the last layer only: edit it there
        point = subspace_representation(subspace)
        config.systems.append(
            SystemConfig(
                "remove-specific",
                kind="baseline",
                subspace=subspace,
                layers="-1" if point == "final_norm" else "top:2",
            )
        )
    if transplant is not None:
        try:
            parts = transplant.split(",") if isinstance(transplant, str) else transplant
            source, target = (int(x) for x in parts)
        except (TypeError, ValueError):
            raise CompareConfigError(
                f"--transplant wants SOURCE,TARGET layers, got {transplant!r}"
            ) from None
        config.systems.append(
            SystemConfig(
                "xtransplant", kind="xtransplant", source_layer=source, target_layer=target
            )
        )
    if transplant_pairs:
        config.systems.append(
            SystemConfig("xtransplant-selected", kind="xtransplant", pairs_file=transplant_pairs)
        )
    return config


# --------------------------------------------------------------------------------------------------
# Scorers: how one system answers the three kinds of question


class ModelScorer:
    """Scores with the (possibly steered) model directly; ``steer(language)`` wraps each call."""

    def __init__(self, model: nn.Module, tokenizer, config: CompareConfig, progress: bool) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.progress = progress

    skip_languages: set[str] = set()  # languages whose outcomes the runner takes from elsewhere

    def steer(self, language: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def supports(self, language: str) -> bool:
        return language not in self.skip_languages

    def generation_groups(self, languages: Sequence[str]) -> list[list[str]]:
        """Languages that can share one generation batch (steering that ignores the language)."""
        return [list(languages)] if languages else []

    def score_options(
        self,
        contexts: Sequence[str],
        options: Sequence[Sequence[str]],
        donors: Sequence[str] | None,
        add_special_tokens: bool,
        language: str,
        description: str,
    ) -> list[list[float]]:
        """Summed option log-likelihoods, ``[item][option]``."""
        requests = [
            ScoringRequest(context, option, add_special_tokens)
            for context, item_options in zip(contexts, options, strict=True)
            for option in item_options
        ]
        with self.steer(language):
            flat = loglikelihoods(
                self.model,
                self.tokenizer,
                requests,
                self.config.batch_size,
                self.config.padding_side,  # type: ignore[arg-type]
                self.progress,
                description,
            )
        scores, start = [], 0
        for item_options in options:
            scores.append([s for s, _ in flat[start : start + len(item_options)]])
            start += len(item_options)
        return scores

    def generate(
        self,
        prompts: Sequence[str],
        donors: Sequence[str] | None,
        add_special_tokens: bool,
        language: str,
        max_new_tokens: int,
        description: str,
        batch_size: int | None = None,
    ) -> list[str]:
        with self.steer(language):
            return generate_greedy(
                self.model,
                self.tokenizer,
                prompts,
                max_new_tokens,
                batch_size or self.config.batch_size,
                add_special_tokens,
                self.progress,
                description,
            )

    def pooled_states(
        self,
        texts: Sequence[str],
        language: str,
        layer: int,
        pooling: str,
        chat_template: bool,
        description: str,
    ) -> torch.Tensor | None:
        """``(n, hidden)`` states at absolute ``layer``; never cached on disk (the model may be
        steered), and without extract's shared-prefix KV cache (incompatible with replay)."""
        from lenssteer.extract import extract_states

        with self.steer(language):
            states = extract_states(
                self.model,
                self.tokenizer,
                texts,
                [layer],
                pooling=pooling,  # type: ignore[arg-type]
                chat_template=chat_template,
                batch_size=self.config.batch_size,
                cache_dir=False,
                progress=self.progress,
                description=description,
                share_prefix=False,  # no KV cache: the lower layers may be replayed
            )
        return states[:, 0]


class BaselineScorer(ModelScorer):
    """A subspace baseline: its hooks are on only while this system scores."""

    def __init__(self, baseline, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.baseline = baseline

    def supports(self, language: str) -> bool:
        allowed = self.baseline.languages()
        return super().supports(language) and (allowed is None or language in allowed)

    def generation_groups(self, languages: Sequence[str]) -> list[list[str]]:
        if self.baseline.mode == "remove-specific":
            return super().generation_groups(languages)
        return [[language] for language in languages]  # the shift depends on the language

    def steer(self, language: str) -> contextlib.AbstractContextManager:
        return self.baseline.steer(self.model, language)


class LanguageShiftScorer(ModelScorer):
    """The language vector of :mod:`lenssteer.language_shift`, on for inputs in one language."""

    def __init__(self, shift, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shift = shift

    def generation_groups(self, languages: Sequence[str]) -> list[list[str]]:
        if not self.shift.strength:  # strength 0 was chosen: the model as it is, one batch
            return super().generation_groups(languages)
        return [[language] for language in languages]  # the shift depends on the language

    def steer(self, language: str) -> contextlib.AbstractContextManager:
        return self.shift.steer(self.model, language)


class TransplantScorer(ModelScorer):
    """XTransplant from the aligned central-language prompt, one (source, target) pair per language.

    Every target language borrows from the same central-language prompts, so each distinct donor
    prompt runs once per comparison: its outputs at every source layer the pairs use are recorded
    in one pass and kept in ``donor_cache`` (shared across units), not recomputed per language.
    """

    def __init__(
        self,
        pairs: Mapping[str, tuple[int, int]],
        granularity: str,
        donor_cache: dict[tuple[str, bool], torch.Tensor],
        *args,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.pairs = dict(pairs)
        self.granularity = granularity
        self.donor_cache = donor_cache

    def donor_vectors(
        self, donors: Sequence[str], language: str, add_special_tokens: bool
    ) -> torch.Tensor:
        """``(n, hidden)``: each donor's output at ``language``'s source layer, recorded once."""
        from lenssteer.transplant import record_donor_activations

        sources = sorted({source for source, _ in self.pairs.values()})
        missing = list(
            dict.fromkeys(d for d in donors if (d, add_special_tokens) not in self.donor_cache)
        )
        if missing:
            recorded = record_donor_activations(
                self.model,
                self.tokenizer,
                missing,
                sources,
                [self.granularity],
                self.config.batch_size,
                add_special_tokens,
            )[self.granularity]
            for donor, values in zip(missing, recorded, strict=True):
                self.donor_cache[(donor, add_special_tokens)] = values  # (len(sources), hidden)
        column = sources.index(self.pairs[language][0])
        return torch.stack([self.donor_cache[(d, add_special_tokens)][column] for d in donors])

    def supports(self, language: str) -> bool:
        return super().supports(language) and (
            language == self.config.central_language or language in self.pairs
        )

    def generation_groups(self, languages: Sequence[str]) -> list[list[str]]:
        """Target languages that share a (source, target) pair; the central language alone."""
        groups: dict[Any, list[str]] = {}
        for language in languages:
            key = "central" if language == self.config.central_language else self.pairs[language]
            groups.setdefault(key, []).append(language)
        return list(groups.values())

    def score_options(self, contexts, options, donors, add_special_tokens, language, description):
        if language == self.config.central_language:
            return super().score_options(
                contexts, options, None, add_special_tokens, language, description
            )
        if donors is None:
            raise ValueError(
                f"XTransplant needs the {self.config.central_language!r} version of every item as "
                f"donor, and some {language!r} items have none ({description})"
            )
        from lenssteer.transplant import transplant_loglikelihoods

        source, target = self.pairs[language]
        scores = transplant_loglikelihoods(
            self.model,
            self.tokenizer,
            list(donors),
            list(contexts),
            [list(o) for o in options],
            source,
            target,
            self.granularity,
            batch_size=self.config.batch_size,
            add_special_tokens=add_special_tokens,
            progress=self.progress,
            donor_vectors=self.donor_vectors(donors, language, add_special_tokens),
        )
        return [scores[i, : len(o)].tolist() for i, o in enumerate(options)]

    def generate(
        self,
        prompts,
        donors,
        add_special_tokens,
        language,
        max_new_tokens,
        description,
        batch_size=None,
    ):
        if language == self.config.central_language:
            return super().generate(
                prompts, None, add_special_tokens, language, max_new_tokens, description, batch_size
            )
        if donors is None:
            raise ValueError(
                f"XTransplant needs the {self.config.central_language!r} prompts as donors "
                f"({description})"
            )
        from lenssteer.transplant import transplant_generate

        source, target = self.pairs[language]
        answers = transplant_generate(
            self.model,
            self.tokenizer,
            list(donors),
            list(prompts),
            source,
            target,
            self.granularity,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size or self.config.batch_size,
            add_special_tokens=add_special_tokens,
            progress=self.progress,
            donor_vectors=self.donor_vectors(donors, language, add_special_tokens),
        )
        return [answer.strip() for answer in answers]

    def pooled_states(self, *args, **kwargs) -> None:
        return None  # the donor is the aligned text itself: retrieval would be circular


# --------------------------------------------------------------------------------------------------
# Systems


@dataclass
class _PreparedSystem:
    config: SystemConfig
    description: dict[str, Any]
    adapter: Any = None
    baseline: Any = None
    pairs: dict[str, tuple[int, int]] = field(default_factory=dict)
    shift: Any = None  # language-shift: a lenssteer.language_shift.LanguageShift once chosen
    donor_cache: dict[tuple[str, bool], torch.Tensor] = field(default_factory=dict)  # xtransplant


def _prepare_system(system: SystemConfig) -> _PreparedSystem:
    """Load what a system needs from disk (before the model is loaded: bad paths fail fast)."""
    description: dict[str, Any] = {"kind": system.kind}
    if system.kind == "lens":
        from lenssteer.adapter import SteeringAdapter

        adapter = SteeringAdapter.from_pretrained(system.adapter)  # type: ignore[arg-type]
        description.update(
            adapter=system.adapter,
            adapter_kind=adapter.kind,
            trained_layers=adapter.config.trained_layers,
            adapter_languages=adapter.config.languages,
            weights_sha256=adapter.config.weights_sha256,
            representation=adapter.config.representation.get("point", "residual"),
        )
        return _PreparedSystem(system, description, adapter=adapter)
    if system.kind == "baseline":
        from lenssteer.baselines import SubspaceBaseline

        baseline = SubspaceBaseline.from_folder(
            system.subspace,  # type: ignore[arg-type]
            system.mode,  # type: ignore[arg-type]
            system.layers,
            system.strength,
        )
        description.update(baseline.describe())
        return _PreparedSystem(system, description, baseline=baseline)
    if system.kind == "xtransplant":
        description.update(granularity=system.granularity, direction="central -> target")
        prepared = _PreparedSystem(system, description)
        if system.pairs_file:
            from lenssteer.transplant_pairs import load_selected_pairs

            data = load_selected_pairs(system.pairs_file)
            for language, value in data.items():
                if isinstance(value, dict) and system.granularity in value:
                    chosen = value[system.granularity]
                    prepared.pairs[language] = (
                        int(chosen["source_layer"]),
                        int(chosen["target_layer"]),
                    )
            description["pairs_file"] = system.pairs_file
            if "dev_item_ids" in data:
                description["pairs_file_dev_item_ids"] = list(data["dev_item_ids"])
        return prepared
    return _PreparedSystem(system, description)


def _resolve_pairs(
    prepared: _PreparedSystem,
    model: nn.Module,
    tokenizer,
    config: CompareConfig,
    exclude_ids: set[str],
    progress: bool,
) -> None:
    """Fill in each target language's (source, target) pair: file, dev selection, or fixed pair."""
    system = prepared.config
    n_layers = len(find_decoder_layers(model))
    targets = [lang for lang in config.languages if lang != config.central_language]
    if system.select_on_dev:
        chosen, dev_ids = _select_pairs_on_dev(
            model, tokenizer, config, system, targets, exclude_ids, n_layers, progress
        )
        check_disjoint(dev_ids, exclude_ids, f"system {system.name!r}: XTransplant pairs")
        prepared.pairs.update(chosen)
        prepared.description["selection"] = {
            "task": "mmlu-translated",
            "dev_items_per_language": len(dev_ids),
            "dev_item_ids": sorted(dev_ids),
            "mode": system.select_mode,
            "disjoint_from_scored_items": True,
        }
    chosen_on = prepared.description.get("pairs_file_dev_item_ids")
    if system.pairs_file and chosen_on is not None:
        check_disjoint(
            chosen_on, exclude_ids, f"system {system.name!r}: pairs file {system.pairs_file}"
        )
    elif system.pairs_file:
        warnings.warn(
            f"system {system.name!r}: {system.pairs_file} does not record the items its pairs were "
            "chosen on (made before lenssteer recorded them), so a dev/score overlap cannot be "
            "ruled out; remake it with lenssteer transplant-grid",
            stacklevel=2,
        )
    if system.source_layer is not None and system.target_layer is not None:
        fixed = tuple(
            resolve_layers([s], n_layers)[0] for s in (system.source_layer, system.target_layer)
        )
        for language in targets:
            prepared.pairs.setdefault(language, fixed)  # type: ignore[arg-type]
    prepared.description["pairs"] = {lang: list(pair) for lang, pair in prepared.pairs.items()}


def _select_pairs_on_dev(
    model, tokenizer, config, system, targets, exclude_ids, n_layers, progress
) -> tuple[dict[str, tuple[int, int]], set[str]]:
    """Best pair per language on dev items of ``system.select_task`` (a multiple-choice task,
    default ``mmlu-translated``) that are not scored in this run.

    Returns the pairs and the dev item ids. Ties: :func:`lenssteer.transplant.select_pair`.
    """
    from lenssteer.transplant import record_donor_activations
    from lenssteer.transplant_pairs import grid_pairs, select_pair, transplant_grid

    task = get_task(system.select_task)
    if not isinstance(task, MultipleChoiceTask):
        raise CompareConfigError(
            f"system {system.name!r}: select_task must be a multiple-choice task, not "
            f"{system.select_task!r}"
        )
    scoring = task.scorings[0]
    available = [lang for lang in targets if lang in task.languages]
    if not available:
        return {}, set()
    items = task.items([config.central_language, *available], None, config.seed)
    common = [i.id for i in items[config.central_language]]
    dev_ids = set(
        sample_ids(common, system.select_on_dev, config.seed, "xtransplant-dev", exclude_ids)
    )
    if not dev_ids:
        raise OverlapError(
            f"system {system.name!r}: no {task.name} items are left for choosing the "
            "XTransplant pair: every item is scored; lower the task's limit, choose on another "
            "task (select_task) or give the pair"
        )
    central = [i for i in items[config.central_language] if i.id in dev_ids]
    donors = [task.requests(tokenizer, item, scoring)[1] for item in central]
    activations = record_donor_activations(
        model, tokenizer, donors, None, [system.granularity], config.batch_size, progress=progress
    )
    pairs = grid_pairs(system.select_mode, n_layers)
    chosen: dict[str, tuple[int, int]] = {}
    for language in available:
        rows = [i for i in items[language] if i.id in dev_ids]
        prompts, options = [], []
        for item in rows:
            requests, context = task.requests(tokenizer, item, scoring)
            prompts.append(context)
            options.append([r.continuation for r in requests])
        grid = transplant_grid(
            model, tokenizer, prompts, options, activations, pairs, control=False, progress=progress
        )[system.granularity]
        answers = torch.tensor([item.answer for item in rows])
        correct = grid.transplant.argmax(-1) == answers.unsqueeze(1)
        chosen[language] = tuple(grid.pairs[select_pair(correct, grid.pairs)])  # type: ignore[assignment]
    return chosen, dev_ids


def _scored_ids(tasks, data, config: CompareConfig) -> dict[str, set[str]]:
    """``{task name: ids scored in this run}`` (central language; every language has the same)."""
    scored: dict[str, set[str]] = {}
    for task, _ in tasks:
        rows = data[task.name]
        if isinstance(task, MultipleChoiceTask):
            ids = {item.id for items in rows.values() for item in items}
        else:  # retrieval texts and generation prompts: {language: [(id, text)]}
            ids = {item_id for pairs in rows.values() for item_id, _ in pairs}
        scored[task.name] = ids
    return scored


def _core_id(item_id: str) -> str:
    """An item's id without the prefix a training corpus adds (``mmlu:``, ``verse:``), so that a
    corpus item and a task item made from the same question or verse compare equal."""
    for prefix in ("verse:", "mmlu:"):
        item_id = item_id.removeprefix(prefix)
    return item_id


def _drop_unscorable_items(tasks, data, systems: Sequence[_PreparedSystem], config) -> None:
    """Remove from every task, for every system alike, the items no system may be scored on: those
    a Lens adapter was trained on or had its settings chosen on (``training_items`` and
    ``selection_items`` in its config) and the config's ``exclude_items``. What was dropped is
    recorded in the adapter system's description (and for ``exclude_items``, in every system's)."""
    groups: list[tuple[dict[str, Any] | None, str, list[str]]] = [
        (None, "excluded_items", list(config.exclude_items))
    ]
    for prepared in systems:
        if prepared.adapter is not None:
            adapter = prepared.adapter.config
            groups.append((prepared.description, "training_items", adapter.training_items))
            groups.append((prepared.description, "selection_items", adapter.selection_items))
    for description, key, item_ids in groups:
        if not item_ids:
            continue
        excluded = {_core_id(item_id) for item_id in item_ids}
        dropped: dict[str, int] = {}
        for task, _ in tasks:
            rows = data[task.name]
            if isinstance(task, MultipleChoiceTask):
                kept = {
                    lang: [i for i in items if _core_id(i.id) not in excluded]
                    for lang, items in rows.items()
                }
            else:  # {language: [(id, text)]}
                kept = {
                    lang: [(i, text) for i, text in pairs if _core_id(i) not in excluded]
                    for lang, pairs in rows.items()
                }
            count = sum(len(v) for v in rows.values()) - sum(len(v) for v in kept.values())
            if count:
                data[task.name] = kept
                dropped[task.name] = count // max(len(rows), 1)
        targets = [description] if description is not None else [p.description for p in systems]
        for target in targets:
            target[key] = len(item_ids)
            target[f"{key}_not_scored"] = dropped


def scored_item_ids(config: CompareConfig) -> dict[str, set[str]]:
    """``{task name: ids}`` a comparison run with ``config`` would score, before any adapter's
    items are dropped (no model is loaded): what a tuning run must keep its dev items away from."""
    config.validate()
    tasks = [(_build_task(t), t) for t in config.tasks]
    data = {task.name: _prepare_task_data(task, config, _limit(tc, config)) for task, tc in tasks}
    return _scored_ids(tasks, data, config)


def _resolve_language_shift(
    prepared: _PreparedSystem,
    model: nn.Module,
    tokenizer,
    config: CompareConfig,
    scored: Mapping[str, set[str]],
    progress: bool,
) -> None:
    """Language means from dev verses, then layer and strength chosen on other dev verses; every
    dev verse (and its neighbours) is disjoint from every verse the run scores."""
    from lenssteer.language_shift import (
        choose_layer_and_strength,
        default_candidate_layers,
        language_means,
    )
    from lenssteer.task_registry import (
        BIBLE_LANGUAGES,
        FIDELITY_INSTRUCTIONS,
        bible_followers,
        bible_neighbourhood,
        bible_verse_pairs,
    )

    system = prepared.config
    missing = [lang for lang in config.languages if lang not in BIBLE_LANGUAGES]
    if missing:
        raise CompareConfigError(
            f"system {system.name!r} (language-shift) builds its language means from public-domain "
            f"Bibles, which lack {', '.join(missing)}; available: {', '.join(BIBLE_LANGUAGES)}"
        )
    n_layers = len(find_decoder_layers(model))
    layers = (
        default_candidate_layers(n_layers)
        if system.layers is None
        else resolve_layers(system.layers, n_layers)
    )
    strengths = [float(s) for s in (system.strengths or [system.strength])]
    n_select = system.select_on_dev or 16
    scored_verses = bible_neighbourhood(set().union(*scored.values()) if scored else set())
    candidates = bible_followers(config.languages)
    # Each dev verse brings its previous verse (the selection's context): keep both off the scored.
    usable = [
        item_id for item_id in candidates if not (bible_neighbourhood([item_id]) & scored_verses)
    ]
    direction_ids, select_ids = _split_dev(
        usable, [system.direction_items, n_select], config.seed, "language-shift-dev"
    )
    check_disjoint(
        [*direction_ids, *select_ids],
        set().union(*scored.values()) if scored else set(),
        f"system {system.name!r}: language-shift layer and strength",
    )
    means_items = bible_verse_pairs(config.languages, set(direction_ids))
    texts = {lang: [item.choices[0] for item in rows] for lang, rows in means_items.items()}
    means = language_means(model, tokenizer, texts, layers, config.batch_size, progress)
    dev_items = bible_verse_pairs(config.languages, set(select_ids))
    dev_prompts = {  # the fidelity task's 'explain' request about each dev verse
        lang: [f"{FIDELITY_INSTRUCTIONS[lang]}\n\n{item.choices[0]}" for item in rows]
        for lang, rows in dev_items.items()
    }
    # Dev answers are generated and judged as the fidelity task's are: its length and batch size.
    fidelity = next((t.settings for t in config.tasks if t.name == "language-fidelity"), {})
    prepared.shift = choose_layer_and_strength(
        model,
        tokenizer,
        means,
        layers,
        strengths,
        dev_items,
        config.central_language,
        config.batch_size,
        config.padding_side,
        progress,
        criterion=system.criterion,
        dev_prompts=dev_prompts,
        max_new_tokens=int(fidelity.get("max_new_tokens", 24)),
        max_likelihood_drop=system.max_likelihood_drop,
        generation_batch_size=int(fidelity.get("batch_size", config.batch_size)),
    )
    prepared.description.update(prepared.shift.describe())
    prepared.description["selection"].update(
        candidate_layers=layers,
        candidate_strengths=strengths,
        direction_item_ids=sorted(direction_ids),
        dev_item_ids=sorted(select_ids),
        disjoint_from_scored_items=True,
    )


def _split_dev(ids, sizes, seed, salt):
    from lenssteer.sampling import split_ids

    parts = split_ids(ids, [*sizes, None], seed, salt)[: len(sizes)]
    for size, part in zip(sizes, parts, strict=True):
        if len(part) < size:
            raise OverlapError(
                f"only {len(part)} dev verses are left after removing the scored ones ({size} "
                "wanted); lower the limits or the dev sizes"
            )
    return parts


@contextlib.contextmanager
def _activate(
    prepared: _PreparedSystem, model: nn.Module, tokenizer, config: CompareConfig, progress: bool
) -> Iterator[ModelScorer]:
    kind = prepared.config.kind
    if kind == "lens":
        applied = prepared.adapter.apply(model)
        try:
            yield ModelScorer(model, tokenizer, config, progress)
        finally:
            applied.remove()
    elif kind == "baseline":
        yield BaselineScorer(prepared.baseline, model, tokenizer, config, progress)
    elif kind == "language-shift":
        yield LanguageShiftScorer(prepared.shift, model, tokenizer, config, progress)
    elif kind == "xtransplant":
        yield TransplantScorer(
            prepared.pairs,
            prepared.config.granularity,
            prepared.donor_cache,
            model,
            tokenizer,
            config,
            progress,
        )
    else:
        yield ModelScorer(model, tokenizer, config, progress)


# --------------------------------------------------------------------------------------------------
# Tasks


def _build_task(task_config: TaskConfig) -> Task:
    if task_config.file:
        return get_task(task_config.file, name=task_config.name, **task_config.settings)
    try:
        return get_task(task_config.name, **task_config.settings)
    except TaskError as error:
        raise TaskError(f"{error} (in the config's [tasks.{task_config.name}])") from None


def _limit(task_config: TaskConfig, config: CompareConfig) -> int | None:
    limits = [x for x in (task_config.limit, config.limit) if x is not None]
    return min(limits) if limits else None


def _task_languages(task: Task, config: CompareConfig) -> list[str]:
    """The run's languages for this task; every one must be available (else a clear error)."""
    task.check_languages(config.languages, getattr(task, "source", None) or None)
    return list(config.languages)


def _prepare_task_data(task: Task, config: CompareConfig, limit: int | None) -> Any:
    languages = _task_languages(task, config)
    if isinstance(task, MultipleChoiceTask):
        items = task.items(languages, limit, config.seed)
        for language, rows in items.items():
            if not rows:
                raise TaskError(f"task {task.name!r} has no items in language {language!r}")
        return items
    if isinstance(task, RetrievalTask):
        targets = [lang for lang in languages if lang != config.central_language]
        return task.texts(targets, config.central_language, limit, config.seed)
    if isinstance(task, GenerationTask):
        return task.prompts(languages, limit, config.seed)
    raise TaskError(f"task {task.name!r} has an unknown kind {task.kind!r}")


@dataclass
class _Unit:
    """One slice of work every system runs: a task, a scoring mode, one language (or all, for
    retrieval). ``run(scorer, system)`` returns the system's outcomes; ``replayable`` says whether
    top-layer systems may reuse the base pass's lower layers (same inputs in the same order)."""

    task: Task
    label: str
    language: str | None
    run: Any
    replayable: bool = True


def _mc_units(task: MultipleChoiceTask, items, tokenizer, config) -> list[_Unit]:
    central = config.central_language
    units = []
    for scoring in task.scorings:
        per_byte_metric, sum_metric = task.metric_names(scoring)
        donors_by_id = {
            item.id: task.requests(tokenizer, item, scoring)[1] for item in items.get(central, [])
        }
        for language, rows in items.items():
            contexts, options, special = [], [], False
            for item in rows:
                requests, context = task.requests(tokenizer, item, scoring)
                contexts.append(context)
                options.append([r.continuation for r in requests])
                special = requests[0].add_special_tokens
            donors = None
            if language != central and all(item.id in donors_by_id for item in rows):
                donors = [donors_by_id[item.id] for item in rows]

            def run(
                scorer,
                system,
                rows=rows,
                contexts=contexts,
                options=options,
                special=special,
                donors=donors,
                language=language,
                scoring=scoring,
                per_byte_metric=per_byte_metric,
                sum_metric=sum_metric,
            ):
                sums = scorer.score_options(
                    contexts,
                    options,
                    donors,
                    special,
                    language,
                    f"{system} | {task.name} {scoring} {language}",
                )
                if scoring == "likelihood":
                    return _likelihood_outcomes(
                        task, rows, options, sums, system, language, per_byte_metric
                    )
                return _choices_to_outcomes(
                    task, rows, options, sums, system, language, per_byte_metric, sum_metric
                )

            units.append(_Unit(task, f"{scoring} {language}", language, run))
    return units


def _likelihood_outcomes(task, rows, options, sums, system, language, metric):
    """Per item: the text's log-likelihood divided by its length in UTF-8 bytes (continuous)."""
    values, details = [], []
    for item_scores, item_options in zip(sums, options, strict=True):
        size = max(1, len(item_options[0].encode("utf-8")))
        values.append(item_scores[0] / size)
        details.append({"loglikelihood": round(item_scores[0], 4), "bytes": size})
    ids = [item.id for item in rows]
    return [Outcomes(task.name, metric, system, language, ids, values, details)]


def _choices_to_outcomes(task, rows, options, sums, system, language, per_byte_metric, sum_metric):
    ids = [item.id for item in rows]
    by_sum, by_byte, details = [], [], []
    for item, item_scores, item_options in zip(rows, sums, options, strict=True):
        normalised = [
            s / max(1, len(o.encode("utf-8")))
            for s, o in zip(item_scores, item_options, strict=True)
        ]
        pick_sum = max(range(len(item_scores)), key=item_scores.__getitem__)
        pick_byte = max(range(len(normalised)), key=normalised.__getitem__)
        by_sum.append(float(pick_sum == item.answer))
        by_byte.append(float(pick_byte == item.answer))
        details.append(
            {
                "answer": item.answer,
                "chosen": pick_byte,
                "chosen_by_sum": pick_sum,
                "loglikelihoods": [round(s, 4) for s in item_scores],
            }
        )
    outcomes = [Outcomes(task.name, per_byte_metric, system, language, ids, by_byte, details)]
    if sum_metric:
        outcomes.append(Outcomes(task.name, sum_metric, system, language, ids, by_sum))
    return outcomes


def _retrieval_unit(task: RetrievalTask, texts, tokenizer, model, config) -> _Unit:
    central = config.central_language
    layer = resolve_layers([task.layer], len(find_decoder_layers(model)))[0]
    template = resolve_chat_template(tokenizer, task.chat_template)

    def run(scorer, system):
        states = {}
        for language, rows in texts.items():
            pooled = scorer.pooled_states(
                [text for _, text in rows],
                language,
                layer,
                task.pooling,
                template,
                f"{system} | {task.name} {language}",
            )
            if pooled is None:
                return []
            states[language] = pooled.double()
        mean = torch.cat(list(states.values())).mean(dim=0)
        unit = {k: torch.nn.functional.normalize(v - mean, dim=-1) for k, v in states.items()}
        ids = [item_id for item_id, _ in texts[central]]
        outcomes = []
        for language in texts:
            if language == central or not scorer.supports(language):
                continue
            nearest = (unit[central] @ unit[language].T).argmax(dim=1)
            hits = (nearest == torch.arange(len(ids))).double().tolist()
            details = [{"nearest": ids[int(j)]} for j in nearest]
            outcomes.append(Outcomes(task.name, "top1", system, language, ids, hits, details))
        return outcomes

    return _Unit(task, "all languages", None, run)


def _generation_units(task: GenerationTask, prompts, tokenizer, config) -> list[_Unit]:
    """One unit for all languages: a system generates for several languages in one batch when its
    steering does not depend on the language (:meth:`ModelScorer.generation_groups`), which makes
    the memory-bound decoding steps several times cheaper on a CPU."""
    from lenssteer.extract import format_texts

    template = resolve_chat_template(tokenizer, None)
    central = config.central_language
    formatted = {
        language: format_texts(tokenizer, [text for _, text in rows], template)
        for language, rows in prompts.items()
    }

    def run(scorer, system):
        languages = [lang for lang in prompts if scorer.supports(lang)]
        outcomes = []
        for group in scorer.generation_groups(languages):
            texts = [text for lang in group for text in formatted[lang]]
            donors = None
            if central in formatted and central not in group:
                donors = [text for _ in group for text in formatted[central]]
            answers = scorer.generate(
                texts,
                donors,
                not template,
                group[0],
                task.max_new_tokens,
                f"{system} | {task.name} {','.join(group)}",
                task.batch_size,
            )
            start = 0
            for language in group:
                rows = prompts[language]
                outcomes += _fidelity_outcomes(
                    task, system, language, rows, answers[start : start + len(rows)]
                )
                start += len(rows)
        return outcomes

    return [_Unit(task, "all languages", None, run, replayable=False)]


def _fidelity_outcomes(task, system, language, rows, answers) -> list[Outcomes]:
    ids = [item_id for item_id, _ in rows]
    judged = [
        strip_copied(answer, message) for answer, (_, message) in zip(answers, rows, strict=True)
    ]
    detected = [detect_language(text) for text in judged]
    detected_raw = [detect_language(answer) for answer in answers]
    details = [
        {
            "answer": answer,
            "detected": found,
            "detected_whole_answer": found_raw,
            "copied_from_prompt": text != " ".join(answer.split()),
        }
        for answer, text, found, found_raw in zip(
            answers, judged, detected, detected_raw, strict=True
        )
    ]
    kinds = getattr(task, "item_kinds", None) or {}
    for item_id, detail in zip(ids, details, strict=True):
        if item_id in kinds:
            detail["kind"] = kinds[item_id]
    extra: dict[str, list[float]] = {}
    for item_id, answer in zip(ids, answers, strict=True):
        for metric, value in task.judge(item_id, language, answer).items():
            extra.setdefault(metric, []).append(value)
    return [
        Outcomes(
            task.name,
            "fidelity",
            system,
            language,
            ids,
            [float(found == language) for found in detected],
            details,
        ),
        Outcomes(
            task.name,
            "fidelity_whole_answer",
            system,
            language,
            ids,
            [float(found == language) for found in detected_raw],
        ),
        *(Outcomes(task.name, metric, system, language, ids, v) for metric, v in extra.items()),
    ]


def _units(task: Task, data, tokenizer, model, config) -> list[_Unit]:
    if isinstance(task, MultipleChoiceTask):
        return _mc_units(task, data, tokenizer, config)
    if isinstance(task, RetrievalTask):
        return [_retrieval_unit(task, data, tokenizer, model, config)]
    return _generation_units(task, data, tokenizer, config)


def _first_changed_layer(prepared: _PreparedSystem, model: nn.Module) -> int | None:
    """Lowest decoder layer a system changes, when it changes only decoder layers (else None)."""
    import re

    n_layers = len(find_decoder_layers(model))
    if prepared.adapter is not None:
        found = [re.search(r"layers\.(\d+)\.", name) for name in prepared.adapter.weights]
        if not found or any(m is None for m in found):
            return None  # weights outside the decoder layers (embeddings, head): no sharing
        return min(int(m.group(1)) for m in found)  # type: ignore[union-attr]
    if prepared.shift is not None:
        return prepared.shift.layer if prepared.shift.strength else None
    if prepared.baseline is not None:
        spec = prepared.baseline.layers
        layers = (
            prepared.baseline.subspace.layers if spec is None else resolve_layers(spec, n_layers)
        )
        return min(layers)
    return None


# --------------------------------------------------------------------------------------------------
# The run


def _check_output_folder(out: Path) -> None:
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").exists())
    ):
        raise CompareConfigError(
            f"output folder {out} exists and is not a comparison report; choose another --out "
            "(the report folder is replaced as a whole)"
        )
    from lenssteer.io import check_writable

    check_writable(out)  # a read-only place is found before any scoring


class _Journal:
    """The outcomes of finished units, appended as a comparison goes, so that an interrupted run
    continues where it stopped instead of starting again (a full comparison takes an hour on 2
    cores).

    A JSON-lines file beside the report folder (``.<name>.partial.jsonl``). Its first line is the
    run's identity: the config, the model's fingerprint, every system's description after its dev
    choices (adapter weight hashes, chosen pairs and strengths) and its subspace files' hashes. A
    run with another identity starts afresh; a torn last line (killed while writing) is ignored.
    The file is removed once the report is written.
    """

    def __init__(self, out: Path, identity: str, resume: bool = True) -> None:
        self.path = out.parent / f".{out.name}.partial.jsonl"
        self.done: dict[str, dict[str, Any]] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            if lines and lines[0] == json.dumps({"identity": identity}):
                for line in lines[1:]:
                    with contextlib.suppress(json.JSONDecodeError):
                        record = json.loads(line)
                        self.done[record["unit"]] = record
        if not self.done:
            self.path.write_text(json.dumps({"identity": identity}) + "\n", encoding="utf-8")

    def get(self, unit: str) -> tuple[list[Outcomes], dict[str, float]] | None:
        record = self.done.get(unit)
        if record is None:
            return None
        return [Outcomes(**o) for o in record["outcomes"]], record["seconds"]

    def add(self, unit: str, outcomes: Sequence[Outcomes], seconds: Mapping[str, float]) -> None:
        record = {"unit": unit, "outcomes": [asdict(o) for o in outcomes], "seconds": seconds}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _run_identity(config: CompareConfig, fingerprint: str, systems) -> str:
    """What must match for a journal's units to be reused (see :class:`_Journal`)."""
    files = []
    for prepared in systems:
        if prepared.config.subspace:
            for path in sorted(Path(prepared.config.subspace).glob("*")):
                files.append([str(path), hashlib.sha256(path.read_bytes()).hexdigest()])
    state = {
        "config": asdict(config),
        "fingerprint": fingerprint,
        "systems": [p.description for p in systems],
        "files": files,
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def run_comparison(
    config: CompareConfig,
    progress: bool = True,
    loaded: tuple[Any, nn.Module] | None = None,
    command: str | None = None,
    write: bool = True,
    share_lower_layers: bool = True,
    resume: bool = True,
) -> dict[str, Any]:
    """Score every system on every task and language; write the report to ``config.out``.

    ``loaded`` may pass an already loaded ``(tokenizer, model)``. Returns the report document
    (:func:`lenssteer.evaluate.write_report`). Bad input fails before any model work: unknown
    tasks, languages a task lacks, missing adapter/subspace folders, an adapter or subspace made for
    another model.

    Work is done unit by unit (a task, scoring mode and language), every system in turn. Systems
    that change only top layers (Lens adapters on decoder layers, subspace baselines) reuse the
    base system's lower-layer outputs for the same inputs (:class:`~lenssteer.evaluate.
    LowerLayerReplay`; exact, ``share_lower_layers=False`` computes everything), and XTransplant's
    central-language rows, which are unpatched by definition, are the base system's.

    With ``write``, every finished unit is journaled beside ``config.out``; a run of the same
    comparison after an interruption reuses those units (``resume=False`` starts afresh).
    """
    from lenssteer.models import load_model

    config.validate()
    started = time.time()
    out = Path(config.out)
    if write:
        _check_output_folder(out)
    if config.threads:
        torch.set_num_threads(config.threads)
    tasks = [(_build_task(t), t) for t in config.tasks]
    for task, _ in tasks:
        _task_languages(task, config)
    systems = [_prepare_system(s) for s in config.systems]
    # Items first: data that cannot be read (multiemo's archive) fails before the model loads.
    data = {task.name: _prepare_task_data(task, config, _limit(tc, config)) for task, tc in tasks}
    tokenizer, model = loaded if loaded is not None else load_model(config.model, config.dtype)
    for prepared in systems:
        if prepared.adapter is not None:
            prepared.adapter.check_base_model(model)
        if prepared.baseline is not None:
            prepared.baseline.check(model)
    _drop_unscorable_items(tasks, data, systems, config)
    scored = _scored_ids(tasks, data, config)
    timings: dict[str, float] = {"loading and items": round(time.time() - started, 1)}
    for prepared in systems:
        clock = time.perf_counter()
        if prepared.config.kind == "xtransplant":
            exclude = scored.get(prepared.config.select_task, set())
            if prepared.config.select_task == "mmlu-translated":
                exclude = exclude | scored.get("mmlu-open", set())
            _resolve_pairs(prepared, model, tokenizer, config, exclude, progress)
        if prepared.config.kind == "language-shift":
            _resolve_language_shift(prepared, model, tokenizer, config, scored, progress)
        if prepared.config.kind in ("xtransplant", "language-shift"):
            timings[f"{prepared.config.name} / choosing on dev items"] = round(
                time.perf_counter() - clock, 1
            )

    base = next((p for p in systems if p.config.kind == "base"), None)
    from lenssteer.adapter import check_base_weights

    base_fingerprint = check_base_weights(model, when="before the comparison")
    order = [base, *[p for p in systems if p is not base]] if base else list(systems)
    first_changed = {p.config.name: _first_changed_layer(p, model) for p in systems}
    shared = [k for k in first_changed.values() if k is not None and k > 0]
    boundary = min(shared) if (share_lower_layers and base and shared) else None

    journal = None
    if write:
        journal = _Journal(out, _run_identity(config, base_fingerprint, systems), resume)
        if journal.done and progress:
            print(
                f"continuing an interrupted run: {len(journal.done)} units already scored "
                f"({journal.path})",
                file=sys.stderr,
            )
    resumed_units, resumed_seconds = 0, 0.0
    outcomes: list[Outcomes] = []
    for task, _ in tasks:
        for k, unit in enumerate(_units(task, data[task.name], tokenizer, model, config)):
            unit_key = f"{task.name}/{k}/{unit.label}"
            done = journal.get(unit_key) if journal else None
            if done is not None:
                outcomes.extend(done[0])
                resumed_units += 1
                for key, seconds in done[1].items():
                    timings[key] = round(timings.get(key, 0.0) + seconds, 1)
                    resumed_seconds += seconds
                continue
            unit_outcomes: list[Outcomes] = []
            unit_seconds: dict[str, float] = {}
            replay = LowerLayerReplay(model, boundary) if boundary and unit.replayable else None
            base_outcomes: list[Outcomes] = []
            for prepared in order:
                name = prepared.config.name
                clock = time.perf_counter()
                central_from_base = (
                    prepared.config.kind == "xtransplant" and base is not None and base_outcomes
                )
                unchanged = (  # language-shift chose strength 0 on dev: it is the base model
                    prepared.shift is not None
                    and not prepared.shift.strength
                    and base is not None
                    and bool(base_outcomes)
                )
                if unchanged or (central_from_base and unit.language == config.central_language):
                    found = [replace(o, system=name) for o in base_outcomes]
                else:
                    if prepared is base and replay is not None:
                        sharing = replay.record()
                    elif replay is not None and replay.supported and first_changed[name]:
                        sharing = replay.replay()
                    else:
                        sharing = contextlib.nullcontext()
                    check_base_weights(model, base_fingerprint, f"before system {name!r}")
                    with _activate(prepared, model, tokenizer, config, progress) as scorer:
                        if unit.language is not None and not scorer.supports(unit.language):
                            continue
                        if central_from_base and unit.language is None:
                            scorer.skip_languages = {config.central_language}
                        with sharing:
                            found = unit.run(scorer, name)
                        if central_from_base and unit.language is None:
                            found += [
                                replace(o, system=name)
                                for o in base_outcomes
                                if o.language == config.central_language
                            ]
                if prepared is base:
                    base_outcomes = found
                unit_outcomes.extend(found)
                key = f"{name} / {task.name}"
                unit_seconds[key] = unit_seconds.get(key, 0.0) + time.perf_counter() - clock
            outcomes.extend(unit_outcomes)
            for key, seconds in unit_seconds.items():
                timings[key] = round(timings.get(key, 0.0) + seconds, 1)
            if journal:
                journal.add(unit_key, unit_outcomes, unit_seconds)

    system_rank = {p.config.name: i for i, p in enumerate(systems)}
    language_rank = {lang: i for i, lang in enumerate(config.languages)}
    task_rank = {task.name: i for i, (task, _) in enumerate(tasks)}
    outcomes.sort(
        key=lambda o: (task_rank[o.task], system_rank[o.system], language_rank.get(o.language, 0))
    )
    identity = model_identity(model)
    metadata = {
        "model": identity["model"],
        "revision": identity["revision"],
        "fingerprint": identity["fingerprint"],
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(next(model.parameters()).device),
        "batch_size": config.batch_size,
        "padding_side": config.padding_side,
        "seed": config.seed,
        "bootstrap": f"{config.bootstrap_resamples} resamples, seed {config.seed}",
        "languages": ", ".join(config.languages),
        "central_language": config.central_language,
        "torch_threads": torch.get_num_threads(),
        "shared_lower_layers": f"below layer {boundary}" if boundary else "no",
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "seconds": round(time.time() - started + resumed_seconds, 1),
        "wall_time": _wall_time(time.time() - started + resumed_seconds),
        "packages": package_versions(),
        "systems": {p.config.name: p.description for p in systems},
        "tasks": {
            task.name: {**task.describe(), "limit": _limit(tc, config)} for task, tc in tasks
        },
        "timings_seconds": timings,
        "config": asdict(config),
    }
    task_notes = {task.name: _task_note(task, systems) for task, _ in tasks}
    if not write:
        from lenssteer.stats import summarize

        return {
            "metadata": metadata,
            "summary": summarize(
                outcomes,
                config.reference_system,
                n_resamples=config.bootstrap_resamples,
                seed=config.seed,
                central_language=config.central_language,
            ),
            "outcomes": [asdict(o) for o in outcomes],
        }
    if resumed_units:
        metadata["resumed"] = (
            f"{resumed_units} units ({resumed_seconds:.0f} s) from an interrupted run"
        )
    document = write_report(
        out,
        outcomes=outcomes,
        metadata=metadata,
        reference_system=config.reference_system,
        primary_metrics={task.name: _primary_metric(task) for task, _ in tasks},
        task_notes=task_notes,
        notes=_systems_note(systems),
        n_resamples=config.bootstrap_resamples,
        seed=config.seed,
        central_language=config.central_language,
        chance={task.name: task.chance for task, _ in tasks if task.chance is not None},
    )
    if journal:
        journal.remove()
    return document


def _wall_time(seconds: float) -> str:
    """The run's wall time for the report header (model loading included when this run loaded
    it; report writing excluded)."""
    return f"{seconds / 60:.1f} min ({seconds:.0f} s, {torch.get_num_threads()} threads)"


def _primary_metric(task: Task) -> str:
    """The task's primary metric if this run produces it, else its first metric."""
    metrics = task.describe()["metrics"]
    return task.primary_metric if task.primary_metric in metrics else metrics[0]


def _task_note(task: Task, systems: Sequence[_PreparedSystem]) -> str:
    note = f"{task.description}. Primary metric: `{_primary_metric(task)}`."
    if isinstance(task, RetrievalTask) and any(p.config.kind == "xtransplant" for p in systems):
        note += " XTransplant does not apply (its donor is the aligned text to retrieve)."
    return note


def _systems_note(systems: Sequence[_PreparedSystem]) -> str:
    lines = ["Systems:"]
    for prepared in systems:
        d = prepared.description
        if d["kind"] == "lens":
            text = (
                f"Lens adapter `{d['adapter']}` ({d['adapter_kind']}, layers {d['trained_layers']})"
            )
        elif d["kind"] == "baseline":
            text = (
                f"training-free `{d['mode']}` from subspace `{d['subspace']}`, layers {d['layers']}, "
                f"strength {d['strength']}"
            )
        elif d["kind"] == "language-shift":
            text = (
                f"language vector (mean of X minus mean of the central language) added at layer "
                f"{d.get('layer')} with strength {d.get('strength')}, chosen on dev verses "
                "disjoint from the scored ones (criterion: "
                f"{(d.get('selection') or {}).get('criterion', 'not recorded')})"
            )
        elif d["kind"] == "xtransplant":
            text = (
                f"XTransplant central -> target, {d['granularity']}, (source, target) pairs "
                f"{d.get('pairs', {})}; central-language items unpatched (the base model's "
                "rows); scored by lenssteer.transplant, which pads on the left"
            )
        else:
            text = "the model as it is"
        lines.append(f"- `{prepared.config.name}`: {text}")
    return "\n".join(lines)


def format_summary(document: Mapping[str, Any]) -> str:
    """A short console summary: each task's primary metric over the target languages, per system."""
    lines = []
    for task, metric in document.get("primary_metrics", {}).items():
        systems = document["summary"][task][metric]
        parts = []
        column = "targets" if any("targets" in c for c in systems.values()) else "average"
        for system, cells in systems.items():
            cell = cells.get(column) or {}
            if cell.get("score") is None:
                continue
            text = f"{system} {100 * cell['score']:.1f}"
            if cell.get("diff") is not None:
                text += f" ({100 * cell['diff']:+.1f} [{100 * cell['diff_low']:+.1f}, {100 * cell['diff_high']:+.1f}]"
                if cell.get("mde") is not None:
                    text += f", MDE {100 * cell['mde']:.1f}"
                    text += " underpowered" if cell.get("underpowered") else ""
                text += ")"
            parts.append(text)
        lines.append(f"{task} ({metric}, {column}): " + "; ".join(parts))
    return "\n".join(lines)
