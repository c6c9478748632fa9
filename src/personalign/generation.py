"""The one decode loop: batched, seeded text generation that stops at end-of-sequence or a stop string.

Every generation in personalign runs here — the base model, an expert, a soup, a K-expert mixture,
the RL rollouts and the server — through :func:`decode` with a pluggable *step*: the step runs the
model(s) on the prompt and then on each chosen token, and returns the (B, V) scores the next token is
drawn from, the repetition penalty already applied (:class:`ModelStep` for one causal LM,
:class:`personalign.mixture.MixtureStep` for K experts mixed token by token). The loop owns what must
be the same for every method: the repetition-penalty bookkeeping, temperature and top-p, the random
stream, end-of-sequence and stop strings, padding of finished rows.

Sampling follows transformers' ``generate`` (temperature, then top-p keeping the smallest set of
tokens whose mass exceeds ``top_p``, then one multinomial draw per row), so a plain model's text here
is what ``model.generate`` gives for the same seed. Tokens in the prompt count as seen by the
repetition penalty, padding does not.

Seeding is per batch, derived from the user's seed and the index of the batch's first item
(:func:`batch_seed`), so a file run that is interrupted and resumed (at a batch boundary, with the same
batch size) produces the same text as an uninterrupted one, and the same seed always gives the same
output. Shapes: B rows, L prompt tokens, T generated tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from personalign.data import batched
from personalign.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "Decoded",
    "ModelStep",
    "SamplingConfig",
    "Step",
    "StepContext",
    "TextStream",
    "batch_generator",
    "batch_seed",
    "cache_argument",
    "check_prompt_lengths",
    "context_length",
    "decode",
    "decode_steps",
    "encode_batch",
    "eos_token_ids",
    "generate_texts",
    "pad_token_id",
    "penalize_repetition",
    "positions",
    "sample_next",
    "sample_rows",
    "seeded_generator",
]


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.1  # small models loop when sampling without one
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 10:
            raise ConfigError(f"temperature must be in [0, 10], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be positive, got {self.repetition_penalty}")


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a response: the generation config's and the tokenizer's end-of-sequence."""
    ids: list[int] = []
    cfg = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for v in (cfg if isinstance(cfg, list) else [cfg]) + [tokenizer.eos_token_id]:
        if v is not None and v not in ids:
            ids.append(int(v))
    if not ids:
        raise ConfigError("the tokenizer defines no end-of-sequence token; generation would never stop")
    return ids


def pad_token_id(tokenizer: PreTrainedTokenizerBase, eos: Sequence[int]) -> int:
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else int(eos[0])


def batch_seed(seed: int, first_index: int) -> int:
    # A fixed odd multiplier spreads nearby seeds; the result stays within torch's seed range.
    return (seed * 1_000_003 + first_index) % (2**63 - 1)


def encode_batch(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)``, each (B, L), for a decoder-only batch.

    Chat-formatted texts already hold their special tokens; plain ones get the tokenizer's.
    """
    if tokenizer.padding_side != "left":
        tokenizer.padding_side = "left"
    add_special = not getattr(tokenizer, "chat_template", None)
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=add_special)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def check_prompt_lengths(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], context: int | None,
                         max_new_tokens: int, first_index: int = 0) -> None:
    """Refuse, before any generation, a prompt whose tokens and ``max_new_tokens`` exceed the model's
    ``context`` (the rule the server applies to a request); ``None`` (unknown context) checks nothing."""
    if not context or not texts:
        return
    add_special = not getattr(tokenizer, "chat_template", None)
    lengths = tokenizer(list(texts), add_special_tokens=add_special)["input_ids"]
    for i, ids in enumerate(lengths):
        if len(ids) + max_new_tokens > context:
            raise DataError(f"prompt {first_index + i + 1} has {len(ids)} tokens; with max_new_tokens {max_new_tokens} "
                            f"that exceeds the model's context of {context} tokens; shorten the prompt or lower "
                            "max_new_tokens")


def context_length(model: Any) -> int | None:
    """The longest sequence ``model`` takes (its position embeddings), when its config says."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting real tokens only, so a left-padded row matches itself alone: (B, L)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


# -- the step interface and the plain-model step ---------------------------------------------------------


@dataclass(frozen=True)
class StepContext:
    """What a step (and a mixture's weight provider) sees before token ``step`` is chosen."""

    step: int
    prompt_ids: torch.Tensor  # (B, L) left-padded
    prompt_mask: torch.Tensor  # (B, L)
    generated: torch.Tensor  # (B, step) tokens chosen so far (pad after a row finished)
    finished: torch.Tensor  # (B,) bool
    seen: torch.Tensor | None = None  # (B, V) bool: tokens the repetition penalty acts on
    expert_logprobs: torch.Tensor | None = None  # (B, K, V) a mixture's experts' next-token log-probs


class Step(Protocol):
    """One decoding step's model work. :func:`decode` calls ``start`` once with the prompt, then for each
    token ``scores`` -> (sample) -> ``accept`` and, unless it was the last, ``advance`` with the token."""

    models: Sequence[Any]  # what :func:`personalign.kernels.fast_decode` speeds up
    vocab_size: int  # width of the scores, known after ``start``

    def start(self, input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor) -> None: ...

    def scores(self, ctx: StepContext, penalty: float) -> torch.Tensor: ...

    def accept(self, tokens: torch.Tensor, ctx: StepContext) -> None: ...

    def advance(self, tokens: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor) -> None: ...


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """The CTRL repetition penalty as transformers applies it: a seen token's positive logit is divided
    by ``penalty``, a negative one multiplied. (B, ..., V) logits, (B, V) seen mask broadcast over the
    middle dimensions (K experts) -> same shape. ``penalty`` is one number, or one per row (B,)."""
    if isinstance(penalty, torch.Tensor):
        if bool((penalty == 1).all()):
            return logits
        penalty = penalty.to(logits.dtype).reshape(-1, *([1] * (logits.dim() - 1)))
    elif penalty == 1:
        return logits
    while seen.dim() < logits.dim():
        seen = seen[:, None]
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def cache_argument() -> str:
    """transformers 5.x renamed ``past_key_values`` to ``cache`` (input and output); follow the installed one."""
    import dataclasses

    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    return "cache" if "cache" in names else "past_key_values"


class ModelStep:
    """One causal LM (a base model, an expert or a merged soup) with its KV cache."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.models = [model]
        self._cache_arg = cache_argument()
        self._cache: Any = None
        self._logits: torch.Tensor | None = None
        self.vocab_size = 0

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> None:
        kw = {self._cache_arg: self._cache} if self._cache is not None else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **kw)
        self._cache = getattr(out, self._cache_arg)
        self._logits = out.logits[:, -1].float()  # (B, V)
        self.vocab_size = self._logits.shape[-1]

    def start(self, input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor) -> None:
        self._cache = None
        self._forward(input_ids, mask, position_ids)

    def scores(self, ctx: StepContext, penalty: float) -> torch.Tensor:
        assert self._logits is not None and ctx.seen is not None
        return penalize_repetition(self._logits, ctx.seen, penalty)

    def accept(self, tokens: torch.Tensor, ctx: StepContext) -> None:
        pass

    def advance(self, tokens: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor) -> None:
        self._forward(tokens[:, None], mask, position_ids)


# -- the loop ---------------------------------------------------------------------------------------------


def sample_next(scores: torch.Tensor, sampling: SamplingConfig,
                generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """Next token per row from (B, V) scores: greedy at temperature 0, else temperature, top-p, one draw.

    ``generator`` a sequence: one generator per row, each row drawing from its own, so a row's tokens do
    not depend on the other rows of its batch (data-parallel RL samples a global batch in slices)."""
    if sampling.temperature == 0:
        return scores.argmax(-1)
    scores = scores / sampling.temperature
    if sampling.top_p < 1:
        # Ascending order: drop the low tail whose total mass stays within 1 - top_p; the top token stays.
        sorted_scores, order = torch.sort(scores, descending=False)
        drop = sorted_scores.softmax(-1).cumsum(-1) <= (1 - sampling.top_p)
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), -torch.inf)
    probs = scores.softmax(-1)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    if len(generator) != probs.shape[0]:
        raise ValueError(f"{len(generator)} generators for {probs.shape[0]} rows; give one per row")
    return torch.cat([torch.multinomial(probs[i : i + 1], 1, generator=g).squeeze(1) for i, g in enumerate(generator)])


def sample_rows(scores: torch.Tensor, temperature: Sequence[float], top_p: Sequence[float],
                generator: torch.Generator | None) -> torch.Tensor:
    """:func:`sample_next` with each row's own temperature and top-p (a batch of requests with different
    settings): (B, V) scores -> (B,) tokens. Greedy rows (temperature 0) take the arg-max; the others
    draw together from ``generator``."""
    out = scores.argmax(-1)
    draw = [i for i, t in enumerate(temperature) if t != 0]
    if not draw:
        return out
    rows = torch.tensor(draw, device=scores.device)
    s = scores[rows] / torch.tensor([temperature[i] for i in draw], device=scores.device, dtype=scores.dtype)[:, None]
    cut = [1 - top_p[i] for i in draw]  # in double precision, as sample_next compares
    if any(c > 0 for c in cut):
        sorted_scores, order = torch.sort(s, descending=False)
        drop = sorted_scores.softmax(-1).cumsum(-1) <= torch.tensor(cut, device=s.device, dtype=s.dtype)[:, None]
        drop[..., -1:] = False
        drop[torch.tensor([c <= 0 for c in cut], device=s.device)] = False  # top_p 1: nothing dropped
        s = s.masked_fill(drop.scatter(1, order, drop), -torch.inf)
    out[rows] = torch.multinomial(s.softmax(-1), 1, generator=generator).squeeze(1)
    return out


class TextStream:
    """One answer's tokens turned into text piece by piece, as a streaming client receives it.

    ``push`` takes each generated token and returns the new text (possibly ""): a trailing incomplete
    UTF-8 sequence waits, and so does whatever could be the start of a stop string; at a stop string the
    text is cut before it and ``stopped`` is set. With ``strip`` (chat answers, which are stripped),
    leading and trailing whitespace wait too. The pieces join to :attr:`text`.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos: Sequence[int], stop: Sequence[str] = (),
                 strip: bool = False) -> None:
        self.tokenizer, self.eos, self.stop, self.strip = tokenizer, set(eos), tuple(stop), strip
        self.tokens: list[int] = []  # the answer's tokens, end-of-sequence excluded
        self.sent = ""
        self.stopped = False

    def _cut(self, text: str) -> str:
        cuts = [text.find(s) for s in self.stop if s in text]
        if cuts:
            self.stopped = True
            return text[: min(cuts)]
        return text

    @property
    def text(self) -> str:
        """The whole answer so far: cut at a stop string (stripped with ``strip``)."""
        text = self._cut(self.tokenizer.decode(self.tokens, skip_special_tokens=True))
        return text.strip() if self.strip else text

    def push(self, token: int) -> str:
        if token in self.eos:
            return ""
        self.tokens.append(token)
        full = self._cut(self.tokenizer.decode(self.tokens, skip_special_tokens=True))
        if self.stopped:
            return self._emit(full, final=True)
        safe = full.removesuffix("\ufffd")
        return self._emit(safe[: len(safe) - self._stop_start(safe)], final=False)

    def _stop_start(self, text: str) -> int:
        """The length of the longest end of ``text`` that a stop string starts with: it must wait, as the
        next tokens may complete the stop string, and then it is cut."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def finish(self) -> str:
        """What is still held back, once the answer has ended."""
        return self._emit(self.text, final=True)

    def _emit(self, text: str, final: bool) -> str:
        if self.strip:
            text = text.strip() if final else text.lstrip().rstrip()
        if len(text) > len(self.sent) and text.startswith(self.sent):
            piece, self.sent = text[len(self.sent):], text
            return piece
        return ""


@dataclass(frozen=True)
class Decoded:
    """One batch's generated tokens."""

    tokens: torch.Tensor  # (B, T) pad after a row finished
    mask: torch.Tensor  # (B, T) long: 1 on generated tokens, the end-of-sequence token included
    reasons: list[str]  # per row: "stop" (end-of-sequence or a stop string) or "length"


def decode_steps(step: Step, input_ids: torch.Tensor, mask: torch.Tensor, sampling: SamplingConfig, *,
                 eos: Sequence[int], pad: int, generator: torch.Generator | Sequence[torch.Generator] | None,
                 stop: Callable[[torch.Tensor], torch.Tensor] | None = None, inference: bool = False,
                 all_done: Callable[[bool], bool] | None = None,
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(tokens, valid, finished)`` (each (B,)) after every step of decoding a left-padded batch.

    ``stop(generated (B, t)) -> (B,) bool`` marks rows that end now (e.g. on a stop string), checked after
    end-of-sequence. ``generator`` None draws from torch's global generator. The model runs without
    gradients, under ``torch.inference_mode`` with ``inference`` (faster; for text only: its tensors
    cannot enter autograd later, as RL rollouts and recorded mixtures do), and with the thin-input
    linear kernels; the caller's own grad mode is untouched while the generator is suspended.
    ``all_done(done) -> bool``: whether every process's rows are finished, for processes that must run
    the model in lockstep (FSDP); the loop ends only then, the finished rows padding meanwhile.
    """
    from personalign.kernels import fast_decode

    if not eos:
        raise ConfigError("no end-of-sequence ids given; generation would never stop")
    if bool((mask.sum(-1) == 0).any()):
        raise ConfigError("a prompt row has no tokens; every row needs at least one unpadded token")
    if bool((mask[:, -1] == 0).any()):
        raise ConfigError("prompts must be left-padded (the last column is padding); set padding_side='left'")
    grad_off = torch.inference_mode if inference else torch.no_grad
    b = input_ids.shape[0]
    device = input_ids.device
    with fast_decode(*step.models):
        with grad_off():
            eos_t = torch.tensor(list(eos), device=device)
            mask = mask.long()
            prompt_mask = mask
            pos = positions(mask)  # (B, L)
            step.start(input_ids, mask, pos)
            vocab = step.vocab_size
            # (B, V) tokens the repetition penalty acts on: the prompt's (padding excluded), then each chosen one
            seen = torch.zeros(b, vocab + 1, dtype=torch.bool, device=device)
            seen.scatter_(1, input_ids.clamp(max=vocab).masked_fill(mask == 0, vocab), True)
            seen = seen[:, :vocab]
            finished = torch.zeros(b, dtype=torch.bool, device=device)
            next_pos = pos[:, -1:] + 1  # (B, 1)
            generated = input_ids.new_zeros(b, 0)  # (B, t): grows by one column per step
        for t in range(sampling.max_new_tokens):
            with grad_off():
                ctx = StepContext(t, input_ids, prompt_mask, generated, finished.clone(), seen)
                scores = step.scores(ctx, sampling.repetition_penalty)  # (B, V)
                nxt = sample_next(scores, sampling, generator)
                nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)  # (B,)
                valid = ~finished
                step.accept(nxt, ctx)
                generated = torch.cat([generated, nxt[:, None]], 1)
                seen = seen.clone()  # the context handed out above keeps its own
                seen[torch.arange(b, device=device)[valid], nxt[valid]] = True
                finished = finished | torch.isin(nxt, eos_t)
                if stop is not None:
                    finished = finished | (stop(generated) & valid)
            yield nxt, valid, finished
            done = bool(finished.all())
            if all_done is not None:
                done = all_done(done)
            if done or t == sampling.max_new_tokens - 1:
                return
            with grad_off():
                mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
                step.advance(nxt, mask, next_pos)
                next_pos = next_pos + 1


def decode(step: Step, input_ids: torch.Tensor, mask: torch.Tensor, sampling: SamplingConfig, *,
           eos: Sequence[int], pad: int, generator: torch.Generator | Sequence[torch.Generator] | None,
           stop: Callable[[torch.Tensor], torch.Tensor] | None = None, inference: bool = False,
           all_done: Callable[[bool], bool] | None = None) -> Decoded:
    """Decode a left-padded (B, L) batch to the end; see :func:`decode_steps`."""
    toks, valid = [], []
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for nxt, ok, finished in decode_steps(step, input_ids, mask, sampling, eos=eos, pad=pad, generator=generator,
                                          stop=stop, inference=inference, all_done=all_done):
        toks.append(nxt)
        valid.append(ok)
    reasons = ["stop" if bool(f) else "length" for f in finished.tolist()]
    return Decoded(torch.stack(toks, 1), torch.stack(valid, 1).long(), reasons)


def seeded_generator(seed: int, device: torch.device | str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def batch_generator(seed: int, first_index: int, device: torch.device | str,
                    seed_range: int | None = None) -> torch.Generator:
    """The generator of the batch starting at ``first_index`` (see :func:`generate_texts`)."""
    s = batch_seed(seed, first_index)
    return seeded_generator(s % seed_range if seed_range is not None else s, device)


def generate_texts(
    make_step: Callable[[], Step],
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    sampling: SamplingConfig = SamplingConfig(),
    *,
    eos: Sequence[int],
    device: torch.device | str,
    batch_size: int = 8,
    first_index: int = 0,
    seed_range: int | None = None,
    on_batch: Callable[[int, list[str]], None] | None = None,
    seeds: Sequence[int] | None = None,
) -> list[str]:
    """Generate a response for each already formatted input text, in batches, each seeded by position.

    ``first_index`` is the position of ``texts[0]`` in a larger run (it seeds the batches);
    ``on_batch(start, responses)`` is called after each batch, e.g. to write results durably.
    ``seed_range`` reduces each batch's seed modulo it (token-level mixtures were always seeded within
    31 bits; kept so that their recorded outputs reproduce). ``seeds``: one per text instead, each row
    drawing from its own generator, so a text's response does not depend on the other texts of its
    batch (data-parallel training generates a batch in slices).
    """
    if seeds is not None and len(seeds) != len(texts):
        raise ValueError(f"{len(seeds)} seeds for {len(texts)} texts; give one per text")
    pad = pad_token_id(tokenizer, eos)
    outputs: list[str] = []
    for start, chunk in batched(list(texts), batch_size):
        ids, mask = encode_batch(tokenizer, chunk, device)
        if seeds is not None:
            gen = [seeded_generator(s, device) for s in seeds[start:start + len(chunk)]]
        else:
            gen = batch_generator(sampling.seed, first_index + start, device, seed_range)
        out = decode(make_step(), ids, mask, sampling, eos=eos, pad=pad, generator=gen, inference=True)
        tokens = out.tokens.masked_fill(out.mask == 0, pad)
        responses = [r.strip() for r in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
        outputs.extend(responses)
        if on_batch is not None:
            on_batch(first_index + start, responses)
    return outputs

