"""Named people's preferences and the picks that produced them, in SQLite (the standard library's).

A profile holds a name, side weights, a method and its options. A pick is one choice between two answers
to the same question (``a``, ``b`` or ``equal``), with the features the estimator read and, optionally, the
side it was asked about. Every write is committed before it returns, so an acknowledged pick survives a
server that is killed a moment later; every call opens its own connection (WAL mode), so many clients and
threads may write at once.

The picks export as preference pairs in the pipeline's format (``prompt``, ``chosen``, ``rejected``,
``side``, ``judge: human``), which ``personalign train-rm`` reads: a pick asked about one side is a label
for that side; an overall pick is a label for the person (side ``profile:NAME``).
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personalign.errors import ConfigError, PreferenceError

__all__ = ["PROFILE_PREFIX", "Profile", "Profiles", "StoredPick", "default_db"]

PROFILE_PREFIX = "profile:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS profiles (
    name TEXT PRIMARY KEY, weights TEXT NOT NULL, method TEXT NOT NULL, options TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS picks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, profile TEXT NOT NULL REFERENCES profiles(name),
    question TEXT NOT NULL, answer_a TEXT NOT NULL, answer_b TEXT NOT NULL, choice TEXT NOT NULL,
    side TEXT, features_a TEXT, features_b TEXT, weights_a TEXT, weights_b TEXT, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS picks_profile ON picks(profile);
"""
CHOICES = ("a", "b", "equal")


def default_db() -> Path:
    from personalign.models import cache_root

    return cache_root() / "profiles.sqlite"


def find_profile(name: str, store: Profiles | None = None) -> Profile:
    """The saved profile ``name`` from ``store`` (default: the cache folder's, which a lookup never creates)."""
    name = check_name(name)
    if store is None:
        if not default_db().is_file():
            raise PreferenceError(f"unknown profile {name!r}; no profile is saved yet ({default_db()})")
        store = Profiles()
    return store.get(name)


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"profile name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
    return name


@dataclass(frozen=True)
class Profile:
    name: str
    weights: dict[str, float]
    method: str = "prompt"
    options: dict[str, Any] = field(default_factory=dict)  # merge, mix, pcm, strength

    def spec(self) -> str:
        """The weights as a preference spec string (``P1A=0.5,P2B=0.8``)."""
        return ",".join(f"{s}={w:g}" for s, w in self.weights.items())


@dataclass(frozen=True)
class StoredPick:
    id: int
    profile: str
    question: str
    answer_a: str
    answer_b: str
    choice: str
    side: str | None = None
    features_a: list[float] | None = None
    features_b: list[float] | None = None
    weights_a: dict[str, float] | None = None
    weights_b: dict[str, float] | None = None


class Profiles:
    """The profile store at ``path`` (created on first use)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_db()
        if self.path.is_dir():
            raise ConfigError(f"profile store {self.path} is a directory; give a file path (an SQLite file)")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._db() as db:
                db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{self.path} is not a usable profile database: {exc}") from None
        except OSError as exc:
            blocker = next((p for p in self.path.parents if p.exists() and not p.is_dir()), None)
            why = f"{blocker} is a file, not a folder" if blocker is not None else exc.strerror or exc
            raise ConfigError(f"profile store {self.path} cannot be created: {why}") from None

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # an acknowledged write is on disk
            with db:  # one transaction, committed on leaving
                yield db

    # -- profiles ---------------------------------------------------------------------------------------

    def save(self, name: str, weights: Mapping[str, float], method: str = "prompt",
             options: Mapping[str, Any] | None = None) -> Profile:
        check_name(name)
        if not weights or not all(isinstance(w, (int, float)) for w in weights.values()):
            raise ConfigError("a profile needs side weights, e.g. {'P1A': 0.5, 'P2B': 0.8}")
        now = time.time()
        with self._db() as db:
            db.execute(
                "INSERT INTO profiles VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                "weights=excluded.weights, method=excluded.method, options=excluded.options, updated=excluded.updated",
                (name, json.dumps(dict(weights)), method, json.dumps(dict(options or {})), now, now))
        return Profile(name, dict(weights), method, dict(options or {}))

    def get(self, name: str) -> Profile:
        with self._db() as db:
            row = db.execute("SELECT name, weights, method, options FROM profiles WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = self.names()
            raise PreferenceError(f"unknown profile {name!r}; known profiles: {', '.join(known) if known else 'none'}")
        return Profile(row[0], json.loads(row[1]), row[2], json.loads(row[3]))

    def names(self) -> list[str]:
        with self._db() as db:
            return [r[0] for r in db.execute("SELECT name FROM profiles ORDER BY name")]

    def delete(self, name: str) -> None:
        self.get(name)
        with self._db() as db:
            db.execute("DELETE FROM picks WHERE profile = ?", (name,))
            db.execute("DELETE FROM profiles WHERE name = ?", (name,))

    # -- picks ------------------------------------------------------------------------------------------

    def add_pick(self, name: str, question: str, answer_a: str, answer_b: str, choice: str, *,
                 side: str | None = None, features_a: Sequence[float] | None = None,
                 features_b: Sequence[float] | None = None, weights_a: Mapping[str, float] | None = None,
                 weights_b: Mapping[str, float] | None = None) -> int:
        """Store one pick (the profile must exist); its id once it is on disk."""
        if choice not in CHOICES:
            raise ConfigError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        if not isinstance(question, str) or not question.strip():
            raise ConfigError("a pick needs a non-empty question")
        for label, text in (("answer_a", answer_a), ("answer_b", answer_b)):  # a model may answer nothing
            if not isinstance(text, str):
                raise ConfigError(f"a pick needs {label}, the text of an answer")
        self.get(name)

        def enc(x: Any) -> str | None:
            return None if x is None else json.dumps(list(x) if isinstance(x, Sequence) else dict(x))

        with self._db() as db:
            cur = db.execute(
                "INSERT INTO picks (profile, question, answer_a, answer_b, choice, side, features_a, features_b, "
                "weights_a, weights_b, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, question, answer_a, answer_b, choice, side, enc(features_a), enc(features_b), enc(weights_a),
                 enc(weights_b), time.time()))
            return int(cur.lastrowid)

    def picks(self, name: str | None = None) -> list[StoredPick]:
        query = "SELECT id, profile, question, answer_a, answer_b, choice, side, features_a, features_b, weights_a, " \
                "weights_b FROM picks"
        with self._db() as db:
            rows = db.execute(query + (" WHERE profile = ? ORDER BY id" if name else " ORDER BY id"),
                              (name,) if name else ()).fetchall()
        return [StoredPick(*r[:7], *[None if v is None else json.loads(v) for v in r[7:]]) for r in rows]

    def pairs(self, name: str | None = None) -> list[dict[str, Any]]:
        """The picks as preference pairs (``equal`` picks say nothing about which is better: left out)."""
        out = []
        for p in self.picks(name):
            if p.choice == "equal":
                continue
            chosen, rejected = (p.answer_a, p.answer_b) if p.choice == "a" else (p.answer_b, p.answer_a)
            out.append({"id": f"pick-{p.id}", "prompt": p.question, "chosen": chosen, "rejected": rejected,
                        "side": p.side or f"{PROFILE_PREFIX}{p.profile}", "judge": "human", "profile": p.profile})
        return out

    def export_pairs(self, path: str | Path, name: str | None = None) -> int:
        rows = self.pairs(name)
        Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return len(rows)
