"""lenssteer as an lm-evaluation-harness model type: any lm_eval task on a steered model.

``LensSteerLM`` is lm_eval's own ``HFLM`` (all its scoring, batching, chat templates and generation)
around a model that lenssteer loaded and steered first:

* ``pretrained``: a bundled name (``qwen2.5-coder-0.5b-instruct``, ...), a Hugging Face id or a
  local folder, resolved by :func:`lenssteer.models.load_model`;
* ``adapter``: a Lens steering adapter folder, applied with
  :meth:`lenssteer.adapter.SteeringAdapter.apply` (an adapter made for another model is an error);
* ``subspace`` (+ ``baseline``, ``baseline_layers``, ``strength``, ``language``): a training-free
  subspace baseline (:mod:`lenssteer.baselines`) kept on for the whole evaluation.

lm_eval 0.4.13 fills its model registry from its own package only (no plugin entry points), so the
name ``lenssteer`` exists once this module is imported. From the command line, run lm_eval through
this module, which registers the name and then hands every argument to lm_eval's own CLI::

    python -m lenssteer.lm_eval_model --model lenssteer \\
        --model_args pretrained=qwen2.5-coder-0.5b-instruct,adapter=checkpoints/ADAPTER \\
        --tasks TASKS [any other lm_eval option]

From Python: ``import lenssteer.lm_eval_model`` and then ``lm_eval.simple_evaluate(model="lenssteer",
model_args=...)``, or pass ``LensSteerLM(...)`` itself as ``model``.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from lenssteer.models import DEFAULT_MODEL

__all__ = ["LensSteerLM", "main"]


@register_model("lenssteer")
class LensSteerLM(HFLM):
    """``HFLM`` over a lenssteer-loaded model, optionally steered by an adapter or a baseline."""

    def __init__(
        self,
        pretrained: str = DEFAULT_MODEL,
        adapter: str | None = None,
        subspace: str | None = None,
        baseline: str = "remove-specific",
        baseline_layers: str | int | None = "top:2",
        strength: float = 1.0,
        language: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        strict: bool = True,
        revision: str | None = None,
        **kwargs: Any,
    ) -> None:
        import torch

        from lenssteer.models import load_model

        if (device is None or str(device).startswith("cuda")) and not torch.cuda.is_available():
            device = "cpu"  # lm_eval's default device is CUDA; run on the CPU when there is none
        tokenizer, model = load_model(
            str(pretrained), dtype=dtype, revision=revision, device=device or "cpu"
        )
        self._steering = contextlib.ExitStack()
        self.lenssteer_info: dict[str, Any] = {"model": model.lenssteer_identity}
        if adapter:
            from lenssteer.adapter import SteeringAdapter

            loaded = SteeringAdapter.from_pretrained(str(adapter))
            applied = loaded.apply(model, strict=bool(strict))
            self._steering.callback(applied.remove)
            self.lenssteer_info["adapter"] = {
                "path": str(adapter),
                "kind": loaded.kind,
                "trained_layers": loaded.config.trained_layers,
                "weights_sha256": loaded.config.weights_sha256,
            }
        if subspace:
            from lenssteer.baselines import SubspaceBaseline

            layers = str(baseline_layers) if baseline_layers is not None else None
            chosen = SubspaceBaseline.from_folder(str(subspace), baseline, layers, float(strength))
            self._steering.enter_context(chosen.steer(model, language, strict=bool(strict)))
            self.lenssteer_info["baseline"] = {**chosen.describe(), "language": language}
        # HFLM takes the model object as it is (the base model: a LoRA adapter is injected in place).
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)

    def get_model_info(self) -> dict[str, Any]:
        info = super().get_model_info()
        info["lenssteer"] = self.lenssteer_info
        return info

    def remove_steering(self) -> None:
        """Take the adapter and baseline hooks off the model again."""
        self._steering.close()


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line with the ``lenssteer`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
