"""Optional libraries: which extra installs each, and the one line that says so.

The extras are the package's own: ``[project.optional-dependencies]`` of ``pyproject.toml`` (read from the
source tree when running from a checkout, so that it is never stale), else the installed package's
``Requires-Dist`` metadata built from it. A library's import name is its distribution name normalised
(``prometheus-client`` -> ``prometheus_client``, ``vaderSentiment`` -> ``vadersentiment``).

:func:`missing_extra` turns the ``ModuleNotFoundError`` of an optional library (raised as is, or as the
cause of another import error) into the extra to install; the CLI prints :func:`install_hint` for it as one
line instead of a traceback, whatever the command. Code that checks a library up front builds its message
with :func:`install_hint` too, so that every message names the same extra and the same command.
"""

from __future__ import annotations

import functools
import re
import traceback
from pathlib import Path

__all__ = ["EXTRA_USES", "extras", "install_command", "install_hint", "missing_extra"]

PACKAGE = "personalign"

# What each extra is for, as a message's subject ("<what> needs the '<extra>' extra").
EXTRA_USES = {
    "judges": "the offline judge",
    "independent": "the independent judge",
    "embed": "on-topic similarity (sentence embeddings)",
    "api": "the LLM judge",
    "serve": "the server",
    "browser": "the playground's browser test",
    "ray": "the Ray executor (--executor ray)",
    "dev": "the test suite",
}
# Code whose import of a library shared by several extras says which one it needs.
_OWNERS = {
    "independent": ("personalign.judges.independent",),
    "serve": ("personalign.serve",),
    "api": ("personalign.judges.llm",),
    "judges": ("personalign.judges.offline",),
}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _requirement_name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[(@]", req.strip(), maxsplit=1)[0]


def _from_pyproject(path: Path) -> dict[str, list[str]] | None:
    try:
        import tomllib
    except ImportError:  # Python 3.10: the installed metadata says the same
        return None
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    project = doc.get("project", {})
    if project.get("name") != PACKAGE:
        return None
    groups = project.get("optional-dependencies", {})
    return {extra: [_requirement_name(r) for r in reqs] for extra, reqs in groups.items()}


def _from_metadata() -> dict[str, list[str]]:
    from importlib import metadata

    try:
        requires = metadata.requires(PACKAGE) or []
    except metadata.PackageNotFoundError:
        return {}
    out: dict[str, list[str]] = {}
    for req in requires:
        m = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
        if m:
            out.setdefault(m.group(1), []).append(_requirement_name(req))
    return out


@functools.lru_cache(maxsize=1)
def extras() -> dict[str, tuple[str, ...]]:
    """Each extra of the package and the distributions it installs, as pyproject.toml lists them."""
    source = Path(__file__).resolve().parents[2] / "pyproject.toml"  # src/personalign/extras.py -> root
    found = _from_pyproject(source) if source.is_file() else None
    return {extra: tuple(dists) for extra, dists in (found if found is not None else _from_metadata()).items()}


def install_command(extra: str) -> str:
    return f"pip install '{PACKAGE}[{extra}]'"


def install_hint(extra: str, what: str | None = None, module: str | None = None) -> str:
    """The one line for a missing extra: ``<what> needs the '<extra>' extra: pip install 'personalign[<extra>]'``."""
    subject = what or EXTRA_USES.get(extra, "this command")
    why = f" ({module} is not installed)" if module else ""
    return f"{subject} needs the '{extra}' extra{why}: {install_command(extra)}"


def _missing_module(exc: BaseException) -> ModuleNotFoundError | None:
    """The ModuleNotFoundError behind ``exc``: itself, or a cause or context of it."""
    seen: set[int] = set()
    at: BaseException | None = exc
    while at is not None and id(at) not in seen:
        seen.add(id(at))
        if isinstance(at, ModuleNotFoundError) and at.name:
            return at
        at = at.__cause__ or at.__context__
    return None


def missing_extra(exc: BaseException) -> tuple[str, str] | None:
    """``(extra, module)`` when ``exc`` is (or was raised from) an optional library's ModuleNotFoundError;
    None for any other error (a missing required library is a broken install, not a missing extra)."""
    missing = _missing_module(exc)
    if missing is None or missing.name is None:
        return None
    module = missing.name.split(".")[0]
    candidates = [extra for extra, dists in extras().items() if extra != "dev"
                  and any(_normal(d) == _normal(module) for d in dists)]
    if not candidates:
        return None
    if len(candidates) > 1:  # the code that imported it says which extra it needs, else the smallest extra
        frames = [f.filename for f in traceback.extract_tb(exc.__traceback__)]
        frames += [f.filename for f in traceback.extract_tb(missing.__traceback__)]
        paths = [p.replace("\\", "/") for p in frames]
        owned = [e for e in candidates if any("/" + o.replace(".", "/") in p
                                              for o in _OWNERS.get(e, ()) for p in paths)]
        candidates = owned or sorted(candidates, key=lambda e: len(extras()[e]))
    return candidates[0], module
