"""``import lenssteer as ls``: the public verbs, imported lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_public_names_resolve_to_the_stage_functions():
    import lenssteer as ls
    from lenssteer.adapter import SteeringAdapter
    from lenssteer.subspace import compute_subspace
    from lenssteer.train import train_lens

    assert ls.compute_subspace is compute_subspace
    assert ls.train_lens is train_lens
    assert ls.SteeringAdapter is SteeringAdapter
    for name in ls.__all__:
        assert getattr(ls, name) is not None
    assert set(ls.__all__) <= set(dir(ls))
    with pytest.raises(AttributeError, match="no attribute 'not_a_verb'"):
        ls.not_a_verb  # noqa: B018


def test_importing_the_package_does_not_load_torch():
    code = "import sys, lenssteer; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
