"""lenssteer: steer the internal representations of causal LMs to make them better in more languages.

``import lenssteer as ls`` gives the object-level verbs; each is imported on first use, so importing
the package stays cheap (no torch until a verb is touched)::

    tokenizer, model = ls.load_model("smollm2-135m-instruct")
    corpus = ls.load_corpus("bible", ["en", "de", "fr"], limit=200)
    states = ls.extract_corpus(model, tokenizer, corpus, layers=[28, 29], chat_template=True)
    subspace = ls.compute_subspace(states, [28, 29], central_language="en")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "load_model": "lenssteer.models",
    "load_corpus": "lenssteer.data",
    "ParallelCorpus": "lenssteer.data",
    "extract_corpus": "lenssteer.extract",
    "compute_subspace": "lenssteer.subspace",
    "Subspace": "lenssteer.subspace",
    "train_lens": "lenssteer.train",
    "TrainConfig": "lenssteer.train",
    "SteeringAdapter": "lenssteer.adapter",
    "transplanted": "lenssteer.transplant",
    "transplant_grid": "lenssteer.transplant_pairs",
    "run_comparison": "lenssteer.compare",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lenssteer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
