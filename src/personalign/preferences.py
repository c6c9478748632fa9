"""Dimensions, sides, and the preferences a user declares over them.

A *dimension* (expertise, informativeness, style, or one a user defines) has opposite *sides*
(elementary / expert, ...). Each side has a policy prompt, appended to the instruction, and a judge
criterion, used for pairwise feedback and evaluation. The built-in sides are the eight P-SOUPS sides
with the exact wording of the benchmark.

A user writes a preference as a string:

* a hard combination, one side per dimension: ``1A,2A,3A``, ``P1A+P2A+P3A`` or
  ``elementary,concise,friendly``;
* a weighted preference, a real weight per side: ``concise=0.7,informative=0.3,friendly=1``.
  Weights may be any finite real number, and both sides of a dimension may appear; sides written
  without ``=`` in a weighted spec get weight 1.

Prompts are always composed in dimension order, whatever order the user wrote, so the same
preference yields the same text in rollouts, reward data, training and evaluation.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from personalign.errors import PreferenceError

__all__ = [
    "Side",
    "Dimension",
    "PreferenceSpace",
    "Preference",
    "BUILTIN_SIDES",
    "PSOUPS_SIDES",
    "EXTRA_SIDES",
    "parse_preference",
    "default_space",
]


@dataclass(frozen=True)
class Side:
    """One side of a dimension: what the policy is asked for and what the judge checks."""

    id: str
    name: str
    dimension: str
    prompt: str
    criterion: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Dimension:
    name: str
    sides: tuple[str, ...]  # side ids, in declaration order


# The P-SOUPS benchmark, word for word. The criteria abbreviated with "..." in the benchmark
# description begin "Choose a response that"; the style criteria read "that is written in ...".
BUILTIN_SIDES: tuple[Side, ...] = (
    Side(
        "P1A", "elementary", "expertise",
        "Generate a response that can be easily understood by an elementary school student.",
        "Choose a response that can easily be understandable by an elementary school student.",
        ("simple", "beginner"),
    ),
    Side(
        "P1B", "expert", "expertise",
        "Generate a response that only a PhD Student in that specific field could understand.",
        "Choose a response that can only be understandable by a PhD student in that specific field.",
        ("phd", "advanced"),
    ),
    Side(
        "P2A", "concise", "informativeness",
        "Generate a response that is concise and to the point, without being verbose.",
        "Choose a response that is concise and to the point, without being verbose.",
        ("brief", "short"),
    ),
    Side(
        "P2B", "informative", "informativeness",
        "Generate a response that is very informative, without missing any background information.",
        "Choose a response that is very informative without missing any background information.",
        ("detailed", "verbose"),
    ),
    Side(
        "P3A", "friendly", "style",
        "Generate a response that is friendly, witty, funny, and humorous, like a close friend.",
        "Choose a response that is friendly, witty, funny and humorous, like a close friend.",
        ("funny", "witty"),
    ),
    Side(
        "P3B", "unfriendly", "style",
        "Generate a response in an unfriendly manner.",
        "Choose a response that is written in an unfriendly manner.",
        ("blunt", "rude"),
    ),
    Side(
        "P3C", "sassy", "style",
        "Generate a response in a sassy manner.",
        "Choose a response that is written in a sassy manner.",
    ),
    Side(
        "P3D", "sarcastic", "style",
        "Generate a response in a sarcastic manner.",
        "Choose a response that is written in a sarcastic manner.",
    ),
)

# The six sides whose 2 x 2 x 2 combinations the benchmark evaluates; P3C and P3D are the extra
# sides that show a preference can be added by training one more expert.
PSOUPS_SIDES: tuple[str, ...] = ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B")
EXTRA_SIDES: tuple[str, ...] = ("P3C", "P3D")

_SIDE_ID = re.compile(r"^P?(\d+)([A-Za-z])$")
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass(frozen=True)
class Preference:
    """A resolved preference: side ids with weights, in dimension order.

    ``hard`` is True for a combination written without weights (every weight 1, at most one side
    per dimension).
    """

    weights: tuple[tuple[str, float], ...]
    hard: bool
    space: PreferenceSpace = field(repr=False, compare=False)

    @property
    def sides(self) -> tuple[str, ...]:
        return tuple(s for s, _ in self.weights)

    def weight_dict(self) -> dict[str, float]:
        return dict(self.weights)

    def prompt_sides(self) -> tuple[str, ...]:
        """The sides whose prompts describe this preference: per dimension, the side with the
        largest positive weight (a prompt cannot say "0.7 concise"; the dominant side can)."""
        chosen: list[str] = []
        for dim in self.space.dimensions.values():
            best = [(w, s) for s, w in self.weights if s in dim.sides and w > 0]
            if best:
                chosen.append(max(best, key=lambda t: t[0])[1])
        return tuple(chosen)

    def prompt(self) -> str:
        """The preference prompt: the chosen sides' prompts joined by single spaces."""
        return " ".join(self.space.sides[s].prompt for s in self.prompt_sides())

    def criteria(self) -> dict[str, str]:
        """Side id -> judge criterion for the sides that carry positive weight."""
        return {s: self.space.sides[s].criterion for s, w in self.weights if w > 0}

    def normalized(self) -> dict[str, float]:
        """Weights divided by the sum of their absolute values (utilities use these)."""
        total = _check_total(dict(self.weights), self.spec())
        return {s: w / total for s, w in self.weights}

    def spec(self) -> str:
        """Canonical string form, parseable by :func:`parse_preference`."""
        if self.hard:
            return ",".join(self.sides)
        return ",".join(f"{s}={_fmt(w)}" for s, w in self.weights)

    def describe(self) -> str:
        """Human-readable form with side names, e.g. ``elementary+concise+friendly``."""
        names = [self.space.sides[s].name for s in self.sides]
        if self.hard:
            return "+".join(names)
        return ",".join(f"{n}={_fmt(w)}" for n, (_, w) in zip(names, self.weights))

    def __str__(self) -> str:
        return self.spec()


def _fmt(w: float) -> str:
    return f"{w:g}"


class PreferenceSpace:
    """The dimensions and sides a preference can be written over.

    The default space holds the eight built-in sides; :meth:`extended_from_yaml` adds a user's own
    dimensions.
    """

    def __init__(self, sides: Iterable[Side]):
        self.sides: dict[str, Side] = {}
        self.dimensions: dict[str, Dimension] = {}
        self._lookup: dict[str, str] = {}
        for side in sides:
            self._add(side)

    # -- construction -------------------------------------------------------------------------
    def _add(self, side: Side) -> None:
        if side.id in self.sides:
            raise PreferenceError(f"side id {side.id!r} is defined twice")
        for kind, key in (("id", side.id), ("name", side.name), *(("alias", a) for a in side.aliases)):
            k = key.lower()
            if k in self._lookup:
                raise PreferenceError(
                    f"side {kind} {key!r} of {side.id} is already used by {self._lookup[k]}; choose another {kind}"
                )
        self.sides[side.id] = side
        for key in (side.id, side.name, *side.aliases):
            self._lookup[key.lower()] = side.id
        m = _SIDE_ID.match(side.id)
        if m:  # "1A" and "p1a" resolve to P1A
            self._lookup.setdefault(f"{m.group(1)}{m.group(2)}".lower(), side.id)
        dim = self.dimensions.get(side.dimension)
        self.dimensions[side.dimension] = Dimension(
            side.dimension, (dim.sides if dim else ()) + (side.id,)
        )

    @classmethod
    def builtin(cls) -> PreferenceSpace:
        return cls(BUILTIN_SIDES)

    def extended_from_yaml(self, path: str | Path) -> PreferenceSpace:
        """A new space with this one's sides plus the dimensions declared in a YAML file::

            dimensions:
              - name: formality
                sides:
                  - name: formal
                    prompt: Generate a response in a formal register.
                    criterion: Choose a response that is written in a formal register.
                  - name: casual
                    id: P4B            # optional; ids default to P<n><letter>
                    prompt: ...
                    criterion: ...
                    aliases: [informal]
        """
        from personalign.data import read_text

        path = Path(path)
        try:
            doc = yaml.safe_load(read_text(path, "dimensions file", PreferenceError))
        except RecursionError:
            raise PreferenceError(f"dimensions file {path} is nested too deeply") from None
        except yaml.YAMLError as exc:
            raise PreferenceError(f"dimensions file {path} is not valid YAML: {_first_line(exc)}") from None
        return PreferenceSpace(list(self.sides.values()) + parse_dimensions(doc, self, where=str(path)))

    # -- look-up --------------------------------------------------------------------------------
    def resolve(self, token: str) -> str:
        """Side id for a token (id, ``1A``, name or alias, any case)."""
        key = token.strip().lower()
        if key in self._lookup:
            return self._lookup[key]
        raise PreferenceError(f"unknown preference side {token.strip()!r}; valid sides: {self.valid_sides_text()}")

    def valid_sides_text(self) -> str:
        return ", ".join(f"{s.id} ({s.name})" for s in self.sides.values())

    def dimension_of(self, side_id: str) -> str:
        return self.sides[side_id].dimension

    def combinations(self, sides: Iterable[str] | None = None) -> list[Preference]:
        """Every hard combination with one side per dimension, over ``sides`` if given, else over
        every side but the extra style sides P3C and P3D.

        For the built-in space this is the benchmark's eight combinations, 1A,2A,3A first.
        """
        if sides is not None:
            allowed = {self.resolve(s) for s in sides}
        else:
            allowed = set(self.sides) - set(EXTRA_SIDES)
        groups = [[s for s in d.sides if s in allowed] for d in self.dimensions.values()]
        groups = [g for g in groups if g]
        return [self.parse(",".join(c)) for c in itertools.product(*groups)]

    # -- parsing --------------------------------------------------------------------------------
    def parse(self, spec: str | Preference | Mapping[str, float]) -> Preference:
        """Parse a preference string (see the module docstring) or a side -> weight mapping."""
        if isinstance(spec, Preference):
            return spec
        if isinstance(spec, Mapping):
            return self._build({self.resolve(k): _check_weight(k, v, self) for k, v in spec.items()}, hard=False)
        if not isinstance(spec, str):
            raise PreferenceError(f"a preference is a string such as '1A,2A,3A' or a mapping of side -> weight, "
                                  f"not {type(spec).__name__}")
        if not spec.strip():
            raise PreferenceError(f"empty preference; write sides like 1A,2A,3A. Valid sides: {self.valid_sides_text()}")
        tokens = _tokens(spec)
        weighted = any("=" in t for t in tokens)
        weights: dict[str, float] = {}
        for tok in tokens:
            if "=" in tok:
                name, _, value = tok.partition("=")
                if not name:
                    raise PreferenceError(f"malformed weight {tok!r}: a side goes before '=', as in concise=0.7")
                side = self.resolve(name)
                try:
                    if "_" in value:  # float() reads 1_0 as 10
                        raise ValueError(value)
                    w = float(value)
                except ValueError:
                    raise PreferenceError(
                        f"malformed weight {tok!r}: the weight must be a real number, as in concise=0.7"
                    ) from None
                w = _check_weight(tok, w, self)
            else:
                side, w = self.resolve(tok), 1.0
            if side in weights:
                raise PreferenceError(f"side {side} ({self.sides[side].name}) appears twice in {spec!r}")
            weights[side] = w
        return self._build(weights, hard=not weighted)

    def _build(self, weights: dict[str, float], hard: bool) -> Preference:
        if not weights:
            raise PreferenceError(f"empty preference; valid sides: {self.valid_sides_text()}")
        if hard:
            seen: dict[str, str] = {}
            for s in weights:
                dim = self.sides[s].dimension
                if dim in seen:
                    other = self.dimensions[dim].sides
                    raise PreferenceError(
                        f"{seen[dim]} and {s} are both sides of {dim!r}; a combination takes one of "
                        f"{', '.join(other)} (or give weights, as in {self.sides[seen[dim]].name}=0.5,"
                        f"{self.sides[s].name}=0.5)"
                    )
                seen[dim] = s
        order = {sid: i for i, sid in enumerate(self.sides)}
        ordered = tuple(sorted(weights.items(), key=lambda kv: order[kv[0]]))
        _check_total(weights, ",".join(f"{s}={_fmt(w)}" for s, w in ordered))
        return Preference(ordered, hard, self)


def _tokens(spec: str) -> list[str]:
    """The sides of a preference string, each with its weight if given: separated by commas, spaces or ``+``,
    where a ``+`` that signs a weight (``concise=+1``, ``concise=1e+3``) stays with it, and spaces around ``=``
    are dropped (``concise = 0.7``)."""
    tokens = []
    for piece in re.split(r"[,\s]+", re.sub(r"\s*=\s*", "=", spec.strip())):
        parts = piece.split("+")
        token = parts[0]
        for part in parts[1:]:
            if re.search(r"=$|=[+-]?[\d.]*\d[eE]$", token):  # the + is part of the weight
                token += "+" + part
            else:
                tokens.append(token)
                token = part
        tokens.append(token)
    return [t for t in tokens if t]


def _check_weight(token: str, w: object, space: PreferenceSpace) -> float:
    try:
        value = float(w)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PreferenceError(f"malformed weight in {token!r}: must be a real number, as in concise=0.7") from None
    if not math.isfinite(value):
        raise PreferenceError(f"malformed weight in {token!r}: must be finite, as in concise=0.7")
    return value


def _check_total(weights: Mapping[str, float], spec: str) -> float:
    """The sum of the weights' absolute values, which every method divides by: refused when zero (no side
    would count, and prompting would silently drop the preference) or when it overflows."""
    total = sum(abs(w) for w in weights.values())
    if total == 0:
        raise PreferenceError(f"preference {spec!r} has all weights zero; give at least one side a non-zero weight")
    if not math.isfinite(total):
        raise PreferenceError(f"the weights of {spec!r} are too large: their sum overflows; use weights of a "
                              "sensible size, as in concise=0.7,friendly=0.3")
    return total


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


_SIDE_KEYS = {"name", "id", "prompt", "criterion", "aliases"}
_DIM_KEYS = {"name", "sides"}


def parse_dimensions(doc: object, base: PreferenceSpace, where: str = "dimensions") -> list[Side]:
    """Validate a ``{"dimensions": [...]}`` document (see :meth:`PreferenceSpace.extended_from_yaml`)."""
    if not isinstance(doc, dict) or set(doc) != {"dimensions"} or not isinstance(doc["dimensions"], list):
        raise PreferenceError(f"{where}: expected a mapping with one key 'dimensions' holding a list")
    next_dim = 1 + max((int(m.group(1)) for s in base.sides if (m := _SIDE_ID.match(s))), default=0)
    sides: list[Side] = []
    for i, dim in enumerate(doc["dimensions"]):
        loc = f"{where}: dimensions[{i}]"
        if not isinstance(dim, dict):
            raise PreferenceError(f"{loc} must be a mapping with 'name' and 'sides'")
        unknown = set(dim) - _DIM_KEYS
        if unknown:
            raise PreferenceError(f"{loc} has unknown key(s) {sorted(unknown)}; allowed: {sorted(_DIM_KEYS)}")
        name = dim.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise PreferenceError(f"{loc}.name must be a lowercase word such as 'formality', got {name!r}")
        if name in base.dimensions:
            raise PreferenceError(f"{loc}: dimension {name!r} already exists")
        dsides = dim.get("sides")
        if not isinstance(dsides, list) or len(dsides) < 2:
            raise PreferenceError(f"{loc}.sides must list at least two sides")
        for j, side in enumerate(dsides):
            sloc = f"{loc}.sides[{j}]"
            if not isinstance(side, dict):
                raise PreferenceError(f"{sloc} must be a mapping with name, prompt and criterion")
            unknown = set(side) - _SIDE_KEYS
            if unknown:
                raise PreferenceError(f"{sloc} has unknown key(s) {sorted(unknown)}; allowed: {sorted(_SIDE_KEYS)}")
            for key in ("name", "prompt", "criterion"):
                if not isinstance(side.get(key), str) or not side[key].strip():
                    raise PreferenceError(f"{sloc}.{key} is required and must be a non-empty string")
            if not _NAME.match(side["name"]):
                raise PreferenceError(f"{sloc}.name must be a lowercase word, got {side['name']!r}")
            sid = side.get("id") or f"P{next_dim}{chr(ord('A') + j)}"
            if not isinstance(sid, str) or not re.match(r"^[A-Za-z][A-Za-z0-9_]*$", sid):
                raise PreferenceError(f"{sloc}.id must be an identifier such as P4A, got {sid!r}")
            aliases = side.get("aliases", [])
            if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
                raise PreferenceError(f"{sloc}.aliases must be a list of strings")
            sides.append(Side(sid, side["name"], name, side["prompt"].strip(), side["criterion"].strip(), tuple(aliases)))
        next_dim += 1
    return sides


_DEFAULT: PreferenceSpace | None = None


def default_space() -> PreferenceSpace:
    """The built-in space (the eight P-SOUPS sides)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = PreferenceSpace.builtin()
    return _DEFAULT


def load_space(dimensions_file: str | Path | None = None) -> PreferenceSpace:
    """The built-in space, extended with a user's YAML dimensions file when one is given."""
    space = default_space()
    return space.extended_from_yaml(dimensions_file) if dimensions_file else space


def parse_preference(spec: str | Preference | Mapping[str, float], space: PreferenceSpace | None = None) -> Preference:
    return (space or default_space()).parse(spec)


def iter_sides(space: PreferenceSpace | None = None) -> Iterator[Side]:
    yield from (space or default_space()).sides.values()
