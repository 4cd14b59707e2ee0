"""Every bad input in scripts/bad_inputs.py gets a clear error and leaves nothing that looks valid."""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import bad_inputs  # noqa: E402


def test_at_least_25_cases():
    assert len(bad_inputs.CASES) >= 25
    assert {case.category for case in bad_inputs.CASES} >= {"config value", "config type", "data", "checkpoint", "path"}


@pytest.mark.parametrize("case", bad_inputs.CASES, ids=lambda case: case.name.replace(" ", "-"))
def test_bad_input_is_reported(case, tmp_path):
    kind, message, leftovers = bad_inputs.attempt(case, tmp_path)
    assert case.expected in message, f"{kind}: {message}"
    assert leftovers == []
