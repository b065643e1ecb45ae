"""The ``lenssteer`` model type for lm-evaluation-harness, run offline on a task made from a local file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from test_compare import make_layers_adapter

pytest.importorskip("lm_eval")

from lenssteer.adapter import AdapterError, SteeringAdapter
from lenssteer.evaluate import ScoringRequest, loglikelihoods
from lenssteer.models import load_model

ITEMS = [
    {"question": "Which number is even?", "choices": ["three", "four", "five"], "answer": 1},
    {"question": "The sky on a clear day is", "choices": ["blue", "green"], "answer": 0},
    {
        "question": "Water freezes at zero degrees",
        "choices": ["Celsius", "Kelvin", "Fahrenheit"],
        "answer": 0,
    },
]
TASK_YAML = """task: lenssteer_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def setup(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    model_dir = root / "tiny-llama"
    make_tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    _, model = load_model(str(model_dir))
    make_layers_adapter(model, 3).save_pretrained(root / "adapter")
    other = make_tiny_model("llama", vocab_size=len(tokenizer), seed=7)
    make_layers_adapter(other, 3).save_pretrained(root / "other-adapter")
    data = root / "toy.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "lenssteer_toy.yaml").write_text(TASK_YAML.format(data=data))
    return root, model_dir, tasks


def _evaluate(model_args: dict, tasks: Path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import lenssteer.lm_eval_model  # noqa: F401  (registers "lenssteer")

    return lm_eval.simple_evaluate(
        model="lenssteer",
        model_args=model_args,
        tasks=["lenssteer_toy"],
        task_manager=TaskManager(include_path=str(tasks)),
        batch_size=2,
        log_samples=True,
    )


def _sample_loglikelihoods(results) -> list[list[float]]:
    samples = sorted(results["samples"]["lenssteer_toy"], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in sample["resps"]] for sample in samples]


def _ours(model, tokenizer) -> list[list[float]]:
    out = []
    for item in ITEMS:
        requests = [
            ScoringRequest(f"Question: {item['question']}\nAnswer:", f" {c}", True)
            for c in item["choices"]
        ]
        out.append([s for s, _ in loglikelihoods(model, tokenizer, requests)])
    return out


def test_lm_eval_scores_the_steered_model(setup):
    root, model_dir, tasks = setup
    plain = _evaluate({"pretrained": str(model_dir)}, tasks)
    steered = _evaluate({"pretrained": str(model_dir), "adapter": str(root / "adapter")}, tasks)
    assert "acc,none" in steered["results"]["lenssteer_toy"]
    assert steered["config"]["lenssteer"]["adapter"]["kind"] == "layers"  # recorded with results

    tokenizer, model = load_model(str(model_dir))
    base_ours = _ours(model, tokenizer)
    with SteeringAdapter.from_pretrained(root / "adapter").apply(model):
        steered_ours = _ours(model, tokenizer)
    # lm_eval's own scoring of our model agrees with lenssteer's scoring, with and without the adapter.
    for theirs, ours in [(plain, base_ours), (steered, steered_ours)]:
        for a, b in zip(_sample_loglikelihoods(theirs), ours, strict=True):
            assert a == pytest.approx(b, abs=1e-3)
    assert not torch.allclose(torch.tensor(base_ours[0]), torch.tensor(steered_ours[0]), atol=1e-3)


def test_adapter_for_another_model_is_refused(setup):
    root, model_dir, tasks = setup
    from lenssteer.lm_eval_model import LensSteerLM

    with pytest.raises(AdapterError, match="fingerprint"):
        LensSteerLM(pretrained=str(model_dir), adapter=str(root / "other-adapter"))


def test_command_line(setup, tmp_path):
    """``python -m lenssteer.lm_eval_model`` is lm_eval's CLI with the model type registered."""
    root, model_dir, tasks = setup
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "lenssteer.lm_eval_model",
        "--model",
        "lenssteer",
        "--model_args",
        f"pretrained={model_dir},adapter={root / 'adapter'}",
        "--tasks",
        "lenssteer_toy",
        "--include_path",
        str(tasks),
        "--batch_size",
        "2",
        "--output_path",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    written = list((tmp_path / "out").rglob("results_*.json"))
    assert len(written) == 1
    results = json.loads(written[0].read_text())
    assert results["results"]["lenssteer_toy"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert results["config"]["model"] == "lenssteer"
