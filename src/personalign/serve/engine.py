"""The server's generation engine: continuous batching of every method, each row with its own preference.

One worker thread owns the models and decodes in *ticks*. Each tick it admits waiting requests, then
advances every running batch by one token. A request never waits for another to finish:

* **The shared batch** (:class:`_RowGroup`) holds every row the base model and the experts' LoRA factors
  can compute together: vanilla and prompt (the base), ``expert`` and exact soups (the base plus each
  row's own weighted sum of the experts' LoRA deltas, :class:`personalign.soups.RowSoups`), and MoPE
  (one *lane* per expert of the row's preference, each lane the base plus one expert, mixed token by
  token with the row's fixed weights or its PCM's per-token weights). Rows join at the next token: the
  newcomers' prompts run in one forward pass and their KV cache is left-padded to the batch's (or the
  batch's to theirs) and appended; rows that end (end of sequence, a stop string, ``max_tokens``, a
  time limit, a client that went away) leave at once, and columns no row still needs are dropped.
  Each row has its own sampling settings (temperature, top-p, repetition penalty, stop strings).
* **Fixed batches** (:class:`_FixedGroup`) run one personalized model on the rows they started with:
  soups whose rule is not linear in the weights (psoups, ties, dare; exact with a rank) on a merged
  model from the bounded cache (:class:`personalign.serve.batching.Models`), requests waiting with the
  same model and settings started together; and every request with a ``seed``, alone, seeded as
  :func:`personalign.generation.generate_texts` seeds a batch, so that it gives the text ``personalign
  generate`` gives whatever else the server is doing. A fixed batch also advances one token per tick.

Shapes: L lanes, C rows (choices), K experts, T cached positions, V vocabulary.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from personalign.errors import PersonalignError
from personalign.generation import (
    SamplingConfig,
    TextStream,
    cache_argument,
    encode_batch,
    eos_token_ids,
    pad_token_id,
    penalize_repetition,
    positions,
    sample_rows,
)
from personalign.serve.batching import ApiError, Models

if TYPE_CHECKING:
    from personalign.personalize import Personalization, PersonalizedModel

log = logging.getLogger("personalign.serve")

__all__ = ["Engine", "Job"]


@dataclasses.dataclass(eq=False)
class Job:
    """One request's generation: ``n`` choices for each input text, all with the same settings.

    The worker resolves ``future`` with ``(text, finish_reason, completion tokens)`` per choice, and, while
    it decodes, calls ``on_event(choice, text piece, finish_reason or None)`` (streaming).
    """

    texts: list[str]
    n: int
    sampling: SamplingConfig
    stop: tuple[str, ...]
    seeded: bool
    chat: bool  # chat answers are stripped like generate's; raw completions are not
    spec: Personalization
    timeout: float | None = None  # seconds from submission; the rows end with finish_reason "time_limit"
    ignore_eos: bool = False  # decode past the end of sequence up to max_tokens (load benchmarks, as vLLM's)
    extra_prompt: str = ""  # what a described preference says beyond the known sides (already in ``texts``)
    on_event: Callable[[int, str, str | None], None] | None = None
    future: Future = dataclasses.field(default_factory=Future)
    prompt_tokens: int = 0
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    _cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    _results: dict[int, tuple[str, str, int]] = dataclasses.field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.texts) * self.n

    def cancel(self) -> None:
        """The client went away: its rows leave their batch at the next token."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def expired(self, now: float) -> bool:
        return self.timeout is not None and now - self.submitted > self.timeout

    def emit(self, index: int, piece: str, reason: str | None) -> None:
        if self.on_event is not None and (piece or reason is not None):
            self.on_event(index, piece, reason)

    def done(self, index: int, result: tuple[str, str, int]) -> None:
        self._results[index] = result
        if len(self._results) == self.rows and not self.future.done():
            self.future.set_result([self._results[i] for i in range(self.rows)])

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)
        if self.on_event is not None:
            self.on_event(-1, str(exc), "error")


class _Choice:
    """One generated sequence of a job, with its text stream and (in the shared batch) its lanes."""

    def __init__(self, job: Job, index: int, tokenizer: Any, eos: Sequence[int],
                 reasons: collections.Counter[str] | None = None) -> None:
        self.job, self.index, self.eos, self.reasons = job, index, set(eos), reasons
        self.text = TextStream(tokenizer, eos, job.stop, strip=job.chat)
        self.count = 0  # tokens generated, end-of-sequence included (as OpenAI counts them)
        self.reason: str | None = None
        # The shared batch's view: lane weights over the experts, and for a mixture its rule and weights.
        self.lane_weights: torch.Tensor | None = None  # (lanes, K)
        self.rule: Any = None  # MixRule for a mixture, None for one lane
        self.alpha: torch.Tensor | None = None  # (lanes,) fixed mixture weights
        self.strength = 1.0  # the extrapolate rule's (its last lane is the base model)
        self.pcm: Any = None  # (pcm, pref (S,), side index (lanes,), prompt_emb (H,), gen_sum (H,))

    @property
    def lanes(self) -> int:
        return 1 if self.lane_weights is None else self.lane_weights.shape[0]

    def accept(self, token: int, valid: bool = True) -> None:
        if not valid or self.reason is not None:
            return
        self.count += 1
        piece = self.text.push(token)
        if piece:
            self.job.emit(self.index, piece, None)
        if (token in self.eos and not self.job.ignore_eos) or self.text.stopped:
            self.finish("stop")
        elif self.count >= self.job.sampling.max_new_tokens:
            self.finish("length")

    def check(self, now: float) -> None:
        if self.reason is None:
            if self.job.cancelled:
                self.finish("cancelled")
            elif self.job.expired(now):
                self.finish("time_limit")

    def finish(self, reason: str) -> None:
        self.reason = reason
        if self.reasons is not None:
            self.reasons[reason] += 1
        self.job.emit(self.index, self.text.finish(), reason)
        self.job.done(self.index, (self.text.text, reason, self.count))


# -- KV caches: rows leave, rows join ------------------------------------------------------------------------


def _layers(cache: Any) -> list[Any]:
    return list(getattr(cache, "layers", []))


def joinable(cache: Any) -> bool:
    """Whether rows can be added to and removed from ``cache`` (transformers' plain dynamic cache)."""
    from transformers.cache_utils import DynamicLayer

    layers = _layers(cache)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _map_cache(cache: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    for layer in _layers(cache):
        layer.keys, layer.values = fn(layer.keys), fn(layer.values)


def _join_caches(old: Any, new: Any) -> None:
    """Append ``new``'s rows to ``old`` (equal lengths), in place of ``old``."""
    for a, b in zip(_layers(old), _layers(new)):
        a.keys, a.values = torch.cat([a.keys, b.keys]), torch.cat([a.values, b.values])


def _left_pad(cache: Any, n: int) -> None:
    if n > 0:
        _map_cache(cache, lambda t: F.pad(t, (0, 0, n, 0)))  # (B, H, T, D): n zero positions in front


# -- the models of the shared batch ----------------------------------------------------------------------------


class _Shared:
    """The base model and, once a request needs them, every expert of the server's experts folder as LoRA
    adapters of one copy of it (:class:`RowSoups`), and the PCMs requests named. Worker thread only."""

    def __init__(self, base: Any, tokenizer: Any, experts_dir: Path | None, model_name: str) -> None:
        self.base, self.tokenizer, self.experts_dir, self.model_name = base, tokenizer, experts_dir, model_name
        self.model = base
        self.soups: Any = None  # RowSoups over ``sides`` once loaded
        self.sides: tuple[str, ...] = ()
        self.pcms: dict[Path, Any] = {}
        self.device = next(base.parameters()).device
        self.cache_arg = cache_argument()
        self._joinable: bool | None = None

    def joinable(self) -> bool:
        """One probe forward: does this model's KV cache let rows join and leave?"""
        if self._joinable is None:
            ids = torch.tensor([[self.tokenizer.eos_token_id or 0]], device=self.device)
            out = self.base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
            self._joinable = joinable(getattr(out, self.cache_arg))
            if not self._joinable:
                log.warning("this model's KV cache does not let rows join a running batch; requests run in "
                            "fixed batches")
        return self._joinable

    def load_experts(self) -> None:
        if self.soups is not None or self.experts_dir is None:
            return
        from personalign import compose
        from personalign.adapters import load_adapter, with_adapters
        from personalign.kernels import plain_copy
        from personalign.soups import RowSoups

        folders = compose.expert_folders(self.experts_dir)
        for folder in folders.values():
            compose.check_base(self.model_name, folder)
        started = time.monotonic()
        peft = with_adapters(plain_copy(self.base), {s: load_adapter(f) for s, f in folders.items()}).eval()
        self.soups, self.sides, self.model = RowSoups(peft, list(folders)), tuple(folders), peft
        log.info("loaded %d experts for per-row soups and mixtures in %.1f s", len(folders), time.monotonic() - started)

    def pcm(self, folder: Path) -> Any:
        if folder not in self.pcms:
            from personalign.pcm import PreferenceControlModel

            self.pcms[folder] = PreferenceControlModel.load(folder, base_model=self.base, device=self.device)
        return self.pcms[folder]

    def serves(self, spec: Personalization) -> bool:
        """Whether the shared batch computes this request exactly as its personalized model would."""
        from personalign.personalize import Method

        m = spec.method
        if m in (Method.VANILLA, Method.PROMPT):
            return True
        if m is Method.ADAPTER or spec.experts_dir is None or self.experts_dir is None:
            return False
        if Path(spec.experts_dir).resolve() != Path(self.experts_dir).resolve():
            return False
        if m is Method.SOUP:
            return spec.options.merge == "exact" and spec.options.merge_rank is None
        if m is Method.MOPE and spec.pcm_dir is not None and spec.options.mix == "extrapolate":
            return False  # the PCM's lanes here carry no base lane: built as its own model instead
        return m in (Method.EXPERT, Method.MOPE)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None,
                cache: Any) -> tuple[torch.Tensor, Any]:
        """Next-token logits (L, V) of each lane, and the cache with the new positions."""
        import contextlib

        kw = {self.cache_arg: cache} if cache is not None else {}
        ctx = self.soups.applied(weights) if self.soups is not None else contextlib.nullcontext()
        with ctx:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                             **kw)
        return out.logits[:, -1].float(), getattr(out, self.cache_arg)


class _RowGroup:
    """The shared batch: rows of any preference and method the shared models compute, joining and leaving
    at every token."""

    def __init__(self, shared: _Shared, eos: Sequence[int], generator: torch.Generator) -> None:
        self.shared, self.eos, self.generator = shared, list(eos), generator
        self.tokenizer = shared.tokenizer
        self.choices: list[_Choice] = []
        self.mask: torch.Tensor | None = None  # (L, T)
        self.next_pos: torch.Tensor | None = None  # (L, 1)
        self.weights: torch.Tensor | None = None  # (L, K)
        self.logits: torch.Tensor | None = None  # (L, V) for the next token
        self.seen: torch.Tensor | None = None  # (C, V) tokens the repetition penalty acts on
        self.cache: Any = None

    def __len__(self) -> int:
        return len(self.choices)

    @property
    def lanes(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def positions(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    # -- rows in -----------------------------------------------------------------------------------------

    def prepare(self, choice: _Choice, spec: Personalization) -> None:
        """Lay out a new row's lanes: its weights over the experts, its mixture rule and weights."""
        from personalign.mixing import MixRule
        from personalign.personalize import Method

        sh = self.shared
        k = len(sh.sides)
        m = spec.method
        if m in (Method.VANILLA, Method.PROMPT):
            choice.lane_weights = torch.zeros(1, k)
        elif m in (Method.EXPERT, Method.SOUP):  # an expert is merged whole, whatever its weight's sign
            w = {s: 1.0 for s in spec.weights} if m is Method.EXPERT else \
                {s: v * spec.options.strength for s, v in spec.weights.items()}  # exact: linear in strength
            choice.lane_weights = torch.tensor([[w.get(s, 0.0) for s in sh.sides]])
        else:  # MoPE: one lane per expert of the preference, each the base plus that expert
            sides = list(spec.weights)
            rule = spec.mix_rule
            # the extrapolate rule adds a last lane for the base model (all weights zero)
            choice.lane_weights = torch.zeros(len(sides) + (rule is MixRule.EXTRAPOLATE), k)
            for i, side in enumerate(sides):
                choice.lane_weights[i, sh.sides.index(side)] = 1.0
            if spec.pcm_dir is not None:
                from personalign.pcm import preference_vector

                pcm = sh.pcm(Path(spec.pcm_dir))
                choice.pcm = [pcm, preference_vector(spec.preference, pcm.sides).float(),
                              torch.tensor(pcm.side_index(sides)), None, None]
                choice.rule = MixRule.PROB
            elif rule is MixRule.UNIFORM:
                choice.rule, choice.alpha = MixRule.PROB, torch.full((len(sides),), 1.0 / len(sides))
            else:
                choice.rule, choice.alpha = rule, torch.tensor([spec.weights[s] for s in sides])
                choice.strength = spec.options.strength

    def admit(self, new: list[tuple[_Choice, str]]) -> None:
        """Run the newcomers' prompts (one forward pass) and append their lanes to the batch."""
        sh = self.shared
        texts = [text for choice, text in new for _ in range(choice.lanes)]
        ids, mask = encode_batch(self.tokenizer, texts, sh.device)
        mask = mask.long()
        pos = positions(mask)
        weights = torch.cat([c.lane_weights for c, _ in new]).to(sh.device)
        logits, cache = sh.forward(ids, mask, pos, weights if sh.soups is not None else None, None)
        vocab = logits.shape[-1]
        first = torch.tensor([0] + [c.lanes for c, _ in new[:-1]]).cumsum(0)  # each row's first lane
        seen = torch.zeros(len(new), vocab + 1, dtype=torch.bool, device=sh.device)
        seen.scatter_(1, ids[first].clamp(max=vocab).masked_fill(mask[first] == 0, vocab), True)
        for (choice, _), lane in zip(new, first.tolist()):
            if choice.pcm is not None:
                from personalign.pcm import pooled_embeddings

                emb = sh.base.get_input_embeddings().weight.detach()
                choice.pcm[3] = pooled_embeddings(emb, ids[lane:lane + 1], mask[lane:lane + 1])[0]
                choice.pcm[4] = torch.zeros_like(choice.pcm[3])
        nxt = pos[:, -1:] + 1
        if self.cache is None:
            self.mask, self.next_pos, self.weights, self.logits, self.cache = mask, nxt, weights, logits, cache
            self.seen = seen[:, :vocab]
        else:
            t_old, t_new = self.mask.shape[1], mask.shape[1]
            if t_new < t_old:
                _left_pad(cache, t_old - t_new)
                mask = F.pad(mask, (t_old - t_new, 0))
            elif t_old < t_new:
                _left_pad(self.cache, t_new - t_old)
                self.mask = F.pad(self.mask, (t_new - t_old, 0))
            _join_caches(self.cache, cache)
            self.mask = torch.cat([self.mask, mask])
            self.next_pos = torch.cat([self.next_pos, nxt])
            self.weights = torch.cat([self.weights, weights])
            self.logits = torch.cat([self.logits, logits])
            self.seen = torch.cat([self.seen, seen[:, :vocab]])
        self.choices.extend(c for c, _ in new)

    # -- one token ---------------------------------------------------------------------------------------

    def _first_lanes(self) -> list[int]:
        out, at = [], 0
        for c in self.choices:
            out.append(at)
            at += c.lanes
        return out

    def _scores(self) -> torch.Tensor:
        """(C, V) next-token scores of every row, its repetition penalty applied (mixtures: per expert)."""
        from personalign.mixing import MixRule, mix_logprobs

        assert self.logits is not None and self.seen is not None
        dev = self.logits.device
        first = self._first_lanes()
        penalty = torch.tensor([c.job.sampling.repetition_penalty for c in self.choices], device=dev)
        scores = self.logits.new_empty(len(self.choices), self.logits.shape[-1])
        single = [i for i, c in enumerate(self.choices) if c.rule is None]
        if single:
            ci = torch.tensor(single, device=dev)
            lanes = torch.tensor([first[i] for i in single], device=dev)
            scores[ci] = penalize_repetition(self.logits[lanes], self.seen[ci], penalty[ci])
        by_rule: dict[Any, list[int]] = collections.defaultdict(list)
        for i, c in enumerate(self.choices):
            if c.rule is not None:
                by_rule[c.rule].append(i)
        for rule, rows in by_rule.items():
            if rule is MixRule.EXTRAPOLATE:
                scores[torch.tensor(rows, device=dev)] = self._extrapolated(rows, first, penalty)
                continue
            kmax = max(self.choices[i].lanes for i in rows)
            # (R, kmax) lanes of each row, padded with its last lane under weight 0
            lane_idx = torch.tensor([[first[i] + min(j, self.choices[i].lanes - 1) for j in range(kmax)]
                                     for i in rows], device=dev)
            raw = self.logits[lane_idx]  # (R, kmax, V)
            alpha = self._alpha(rows, raw, kmax)
            ci = torch.tensor(rows, device=dev)
            scores[ci] = mix_logprobs(F.log_softmax(penalize_repetition(raw, self.seen[ci], penalty[ci]), dim=-1),
                                      alpha, rule)
        return scores

    def _extrapolated(self, rows: list[int], first: list[int], penalty: torch.Tensor) -> torch.Tensor:
        """(R, V) scores of extrapolate-rule rows: each row's expert lanes (padded with weight 0) and its last
        lane, the base model, each with the repetition penalty applied."""
        from personalign.mixing import mix_extrapolate

        assert self.logits is not None and self.seen is not None
        dev = self.logits.device
        kmax = max(self.choices[i].lanes - 1 for i in rows)
        lane_idx = torch.tensor([[first[i] + min(j, self.choices[i].lanes - 2) for j in range(kmax)]
                                 for i in rows], device=dev)  # (R, kmax)
        base_idx = torch.tensor([first[i] + self.choices[i].lanes - 1 for i in rows], device=dev)  # (R,)
        alpha = torch.zeros(len(rows), kmax, device=dev)
        for r, i in enumerate(rows):
            alpha[r, : self.choices[i].lanes - 1] = self.choices[i].alpha.to(dev)
        ci = torch.tensor(rows, device=dev)
        seen, pen = self.seen[ci], penalty[ci]
        experts = penalize_repetition(self.logits[lane_idx], seen, pen)  # (R, kmax, V)
        base = penalize_repetition(self.logits[base_idx], seen, pen)  # (R, V)
        strength = torch.tensor([self.choices[i].strength for i in rows], device=dev)
        return mix_extrapolate(experts, base, alpha, strength)

    def _alpha(self, rows: list[int], raw: torch.Tensor, kmax: int) -> torch.Tensor:
        """(R, kmax) mixture weights: each row's fixed ones, or its PCM's for this token."""
        from personalign.pcm import PCMInputs, step_inputs

        alpha = torch.zeros(len(rows), kmax, device=raw.device)
        by_pcm: dict[int, list[int]] = collections.defaultdict(list)
        for r, i in enumerate(rows):
            c = self.choices[i]
            if c.pcm is None:
                alpha[r, : c.lanes] = c.alpha.to(raw.device)
            else:
                by_pcm[id(c.pcm[0])].append(r)
        for group in by_pcm.values():
            cs = [self.choices[rows[r]] for r in group]
            pcm = cs[0].pcm[0]
            s = len(pcm.sides)
            pref = torch.stack([c.pcm[1] for c in cs]).to(raw.device)  # (P, S)
            if not pcm.config.context:
                full = pcm(PCMInputs(pref))  # (P, S)
            else:  # the features of each row's own experts (PCMWeights over only those does the same)
                slots = torch.full((len(cs), kmax), -1, dtype=torch.long, device=raw.device)
                for j, c in enumerate(cs):
                    slots[j, : c.lanes] = c.pcm[2].to(raw.device)
                inputs = step_inputs(pcm, pref, slots, F.log_softmax(raw[group], dim=-1), [c.count for c in cs],
                                     torch.stack([c.pcm[3] for c in cs]), torch.stack([c.pcm[4] for c in cs]))
                full = pcm(inputs)[:, 0]  # (P, S)
            for j, (r, c) in enumerate(zip(group, cs)):
                alpha[r, : c.lanes] = full[j, c.pcm[2].to(raw.device)]
        return alpha

    def step(self, now: float) -> int:
        """Choose every row's next token, let finished rows leave, and run the rest one position on;
        the number of tokens chosen."""
        for c in self.choices:
            c.check(now)
        self._keep([i for i, c in enumerate(self.choices) if c.reason is None])
        if not self.choices:
            return 0
        chosen = len(self.choices)
        tokens = sample_rows(self._scores(), [c.job.sampling.temperature for c in self.choices],
                             [c.job.sampling.top_p for c in self.choices], self.generator)
        assert self.seen is not None
        self.seen[torch.arange(len(self.choices)), tokens] = True
        emb = None
        for c, tok in zip(self.choices, tokens.tolist()):
            if c.pcm is not None:
                if emb is None:
                    emb = self.shared.base.get_input_embeddings().weight.detach()
                c.pcm[4] = c.pcm[4] + emb[tok].float()
            c.accept(tok)
        keep = [i for i, c in enumerate(self.choices) if c.reason is None]
        tokens = tokens[keep]
        self._keep(keep)
        if self.choices:
            self._advance(tokens)
        return chosen

    def _advance(self, tokens: torch.Tensor) -> None:
        assert self.mask is not None and self.next_pos is not None
        lanes = torch.tensor([c.lanes for c in self.choices], device=tokens.device)
        ids = tokens.repeat_interleave(lanes)[:, None]  # (L, 1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        weights = self.weights if self.shared.soups is not None else None
        self.logits, self.cache = self.shared.forward(ids, self.mask, self.next_pos, weights, self.cache)
        self.next_pos = self.next_pos + 1

    def _keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (choice indices, in order) and their lanes; drop columns no lane needs."""
        if len(rows) == len(self.choices):
            return
        if not rows:
            self.choices, self.cache = [], None
            self.mask = self.next_pos = self.weights = self.logits = self.seen = None
            return
        assert self.mask is not None
        first = self._first_lanes()
        lanes = torch.tensor([first[i] + j for i in rows for j in range(self.choices[i].lanes)],
                             device=self.mask.device)
        self.mask, self.next_pos, self.logits = self.mask[lanes], self.next_pos[lanes], self.logits[lanes]
        self.weights = self.weights[lanes]
        self.seen = self.seen[torch.tensor(rows, device=self.mask.device)]
        _map_cache(self.cache, lambda t: t[lanes])
        self.choices = [self.choices[i] for i in rows]
        used = self.mask.any(0).nonzero()
        lead = int(used[0]) if used.numel() else 0
        if lead > 0:  # padding in front of every remaining row
            self.mask = self.mask[:, lead:]
            _map_cache(self.cache, lambda t: t[:, :, lead:])


class _FixedGroup:
    """Rows that started together on one personalized model (a merged soup, or a seeded request)."""

    def __init__(self, model: PersonalizedModel, jobs: list[Job], seed: int, tokenizer: Any,
                 reasons: collections.Counter[str] | None = None) -> None:
        self.choices = [_Choice(job, i, tokenizer, model.eos, reasons) for job in jobs for i in range(job.rows)]
        texts = [text for job in jobs for text in job.texts for _ in range(job.n)]
        self.model = model
        self.steps = model.decode_steps(texts, jobs[0].sampling, seed=seed, stop=jobs[0].stop,
                                        ignore_eos=jobs[0].ignore_eos)

    def __len__(self) -> int:
        return sum(c.reason is None for c in self.choices)

    @property
    def lanes(self) -> int:
        return len(self.choices)

    def step(self, now: float) -> int:
        for c in self.choices:
            c.check(now)
        if not len(self):
            self.steps.close()
            return 0
        try:
            nxt, valid, finished = next(self.steps)
        except StopIteration:  # the loop ended without a token: nothing left to decode
            nxt = valid = finished = None
        if nxt is None:
            for c in self.choices:
                if c.reason is None:
                    c.finish("length")
            return 0
        chosen = 0
        for c, tok, ok, end in zip(self.choices, nxt.tolist(), valid.tolist(), finished.tolist()):
            if ok and c.reason is None:
                chosen += 1
                c.accept(tok)
                if end and c.reason is None:  # a stop string the loop saw (it decodes the tail alone)
                    c.finish("stop")
        return chosen


class Engine:
    """A bounded queue of jobs and the worker thread that decodes them (see the module docstring).

    ``max_batch`` bounds the rows decoding at once (a MoPE row runs one lane per expert); ``max_queue``
    the jobs waiting to start: a full queue refuses new jobs with HTTP 429 instead of growing. At most
    ``models.max_models`` merged models decode at once (each is a copy of the base). ``continuous=False``
    turns the shared batch off: every request then runs in a fixed batch on its own personalized model
    (merged per weight vector), as a server without per-row soups and mixtures does (for comparison).
    """

    def __init__(self, models: Models, *, max_batch: int, max_queue: int, experts_dir: Path | None,
                 model_name: str, continuous: bool = True) -> None:
        self.continuous = continuous
        self.models, self.tokenizer = models, models.tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.eos = eos_token_ids(models.base, models.tokenizer)
        self.pad = pad_token_id(models.tokenizer, self.eos)
        self.shared = _Shared(models.base, models.tokenizer, experts_dir, model_name)
        self.generator = torch.Generator(device=self.shared.device).manual_seed(secrets.randbits(62))
        self.open = _RowGroup(self.shared, self.eos, self.generator)
        self.fixed: list[_FixedGroup] = []
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        # Totals for /health and /metrics (read from other threads; ints and floats only).
        self.ticks = self.jobs_started = self.tokens = self.lanes_sum = 0
        self.batch_rows = 0  # rows decoding now
        self.batch_hist: collections.Counter[int] = collections.Counter()  # rows per tick
        self.finished: collections.Counter[str] = collections.Counter()  # rows ended, by finish reason

    # -- the clients' side ------------------------------------------------------------------------------

    def submit(self, job: Job) -> Future:
        with self._cond:
            if self._closed:
                raise ApiError("the server is shutting down", status=503, code="shutting_down")
            if len(self._pending) >= self.max_queue:
                raise ApiError(f"the server is busy: {len(self._pending)} requests are waiting; retry shortly",
                               status=429, code="queue_full")
            if self._thread is None:  # started on first use, so a TestClient without lifespan works
                self._thread = threading.Thread(target=self._loop, name="personalign-generate", daemon=True)
                self._thread.start()
            self._pending.append(job)
            self._cond.notify()
        return job.future

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def close(self, timeout: float = 30.0) -> None:
        """Finish the jobs already queued or running, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the worker ---------------------------------------------------------------------------------------

    def _rows(self) -> int:
        return len(self.open) + sum(len(g) for g in self.fixed)

    def _take(self) -> list[Job] | None:
        """Jobs to start now, oldest first, while the batch has room; None when the worker should stop."""
        with self._cond:
            while not self._pending and not self._rows() and not self._closed:
                self._cond.wait()
            if not self._pending and not self._rows():
                return None
            room, out = self.max_batch - self._rows(), []
            while self._pending and (self._pending[0].rows <= room or (not out and not self._rows())):
                job = self._pending.popleft()
                room -= job.rows
                out.append(job)
            return out

    def _loop(self) -> None:
        from personalign.kernels import fast_decode

        while (jobs := self._take()) is not None:
            live = [job for job in jobs  # a job put back to wait for a merged model is already running
                    if not job.cancelled and (job.future.running() or job.future.set_running_or_notify_cancel())]
            # Models are built (copied, merged) outside the decoding contexts: a copy made inside would carry
            # their routing of the original's layers.
            shared = self._admit(live) if live else []
            with torch.inference_mode(), fast_decode(self.shared.model, self.shared.base):
                if shared:
                    try:
                        self.open.admit(shared)
                    except Exception as exc:  # noqa: BLE001
                        log.exception("admitting rows failed")
                        for choice, _ in shared:
                            choice.job.fail(_as_api_error(exc))
                self._tick()

    def _admit(self, jobs: list[Job]) -> list[tuple[_Choice, str]]:
        """Place each job: its rows for the shared batch (returned, to run their prompts), or a fixed batch."""
        if self.continuous and self.shared.soups is None and any(j.spec.method.uses_experts and self.shared.serves(j.spec)
                                                                 for j in jobs):
            try:
                self.shared.load_experts()
            except Exception as exc:  # noqa: BLE001 - the requests that need them fail, the others go on
                log.exception("loading the experts failed")
                for job in [j for j in jobs if j.spec.method.uses_experts]:
                    job.fail(_as_api_error(exc))
                jobs = [j for j in jobs if not j.spec.method.uses_experts]
            if self.open.weights is not None:  # rows already decoding are base rows: zero expert weights
                self.open.weights = self.open.weights.new_zeros(self.open.lanes, len(self.shared.sides))
        shared: list[tuple[_Choice, str]] = []
        fixed: dict[object, list[Job]] = {}
        for job in jobs:
            self.jobs_started += 1
            try:
                if self.continuous and not job.seeded and self.shared.serves(job.spec) and self.shared.joinable():
                    for i in range(job.rows):
                        choice = _Choice(job, i, self.tokenizer, self.eos, self.finished)
                        self.open.prepare(choice, job.spec)
                        shared.append((choice, job.texts[i // job.n]))
                else:  # seeded: alone; otherwise with the jobs of the same model and settings
                    key = job if job.seeded else (job.spec.key(), job.sampling, job.stop, job.ignore_eos)
                    fixed.setdefault(key, []).append(job)
            except Exception as exc:  # noqa: BLE001 - one bad request fails alone
                job.fail(_as_api_error(exc))
        building = sum(g.model.spec.method.changes_weights for g in self.fixed)
        for group in fixed.values():
            if group[0].spec.method.changes_weights:
                if building >= self.models.max_models:  # wait for a merged model to finish decoding
                    with self._cond:
                        self._pending.extendleft(reversed(group))
                    self.jobs_started -= len(group)
                    continue
                building += 1
            try:
                model = self.models.get(group[0].spec)
                seed = group[0].sampling.seed if group[0].seeded else secrets.randbits(62)
                self.fixed.append(_FixedGroup(model, group, seed, self.tokenizer, self.finished))
            except Exception as exc:  # noqa: BLE001 - its requests fail, the others go on
                log.exception("building a model failed")
                for job in group:
                    job.fail(_as_api_error(exc))
        return shared

    def _tick(self) -> None:
        now = time.monotonic()
        rows = self._rows()
        if rows:
            self.ticks += 1
            self.batch_rows = rows
            self.lanes_sum += self.open.lanes + sum(g.lanes for g in self.fixed)
            self.batch_hist[rows] += 1
        for group in [self.open, *self.fixed]:
            if not len(group):
                continue
            try:
                self.tokens += group.step(now)
            except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests, never the worker
                log.exception("generation failed")
                error = _as_api_error(exc)
                for c in group.choices:
                    if c.reason is None:
                        c.reason = "error"
                        c.job.fail(error)
                if group is self.open:
                    self.open = _RowGroup(self.shared, self.eos, self.generator)
        self.fixed = [g for g in self.fixed if len(g)]
        self.batch_rows = self._rows()


def _as_api_error(exc: BaseException) -> Exception:
    if isinstance(exc, (ApiError, PersonalignError)):
        return exc
    return ApiError(f"generation failed: {type(exc).__name__}: {exc}", status=500)
