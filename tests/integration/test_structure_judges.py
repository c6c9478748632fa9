"""The prose side's labelling judge (examples/structure/coherence_judge.py) on its hand-written pairs, with
the embedded model it reads them with."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "structure"


def test_the_coherence_judge_prefers_the_answer_that_builds_on_its_pairs(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.delenv("PERSONALIGN_COHERENCE_MODEL", raising=False)
    import coherence_judge

    try:
        coherence_judge._model.cache_clear()
        table = coherence_judge.validate()
        assert table["design"]["accuracy"] >= 0.9 and table["held_out"]["accuracy"] >= 0.9
        for kind in ("shuffled", "drift", "unfinished"):  # what the rule-based judges cannot see
            right, total = map(int, table["design"]["by_kind"][kind].split("/"))
            assert right == total
    finally:
        coherence_judge._model.cache_clear()
        sys.modules.pop("coherence_judge", None)
