"""The experts and Preference Control Model that personalign ships for SmolLM2-135M-Instruct.

personalign finds them through the ``personalign.weights`` entry point this distribution registers
(see ``personalign.weights``); nothing here needs importing by hand.
"""

from __future__ import annotations

from pathlib import Path

MODEL = "smollm2-135m-instruct"
_HERE = Path(__file__).resolve().parent


def folders() -> dict[str, Path | None]:
    """The experts folder (``<SIDE>/`` expert folders) and the PCM folder."""
    pcm = _HERE / "pcm"
    return {"experts": _HERE / "experts", "pcm": pcm if (pcm / "pcm.json").is_file() else None}
