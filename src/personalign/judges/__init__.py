"""Pairwise judges: one verdict ("a", "b" or "tie") per pair of responses and side.

:class:`OfflineJudge` measures text properties and needs no network or model
(``pip install 'personalign[judges]'``).
"""

from __future__ import annotations

from personalign.judges.base import PairwiseJudge, UnsupportedSideError, Verdict, flip_verdict
from personalign.judges.offline import DEFAULT_MARGINS, SUPPORTED_SIDES, OfflineJudge, side_score

__all__ = [
    "DEFAULT_MARGINS",
    "SUPPORTED_SIDES",
    "OfflineJudge",
    "PairwiseJudge",
    "UnsupportedSideError",
    "Verdict",
    "flip_verdict",
    "side_score",
]
