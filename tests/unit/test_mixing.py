"""Token-level mixing: the pure rules, and the engine against plain transformers/peft on a tiny llama."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_experts, build_tiny_model, build_tiny_tokenizer

from personalign.errors import ConfigError, ModelError
from personalign.experts import Experts, score_responses
from personalign.generation import SamplingConfig, StepContext
from personalign.mixing import (
    MixRule,
    mix_logit,
    mix_logprobs,
    mix_prob,
    mix_uniform,
    mixture_sequence_logprob,
    mixture_token_logprob,
)
from personalign.mixture import FixedWeights, generate_mixed

NAMES = ["p1a", "p2b", "p3a"]
PROMPTS = ["Explain photosynthesis to me.", "List five painters.", "What is the capital of France? Tell me."]
GREEDY = SamplingConfig(max_new_tokens=8, temperature=0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def tok():
    t = build_tiny_tokenizer()
    t.padding_side = "left"
    return t


@pytest.fixture(scope="module")
def peft_model(tok):
    """A tiny llama with three LoRA experts whose B matrices are random (peft starts them at zero)."""
    return build_tiny_experts(tok, NAMES)


@pytest.fixture(scope="module")
def merged(peft_model):
    """Each adapter merged into its own copy of the base: the black-box setting with identical experts."""
    return [copy.deepcopy(peft_model).merge_and_unload(adapter_names=[n]).eval() for n in NAMES]


@pytest.fixture(scope="module")
def batch(tok):
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any()  # the batch really is left-padded
    return enc["input_ids"], enc["attention_mask"]


def _eos(tok):
    return [tok.eos_token_id]


def _expert_logprobs_by_switching(model, ids, mask, names):
    """Reference: one plain forward per expert with that adapter active -> (B, K, S, V) log-probs."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = []
    with torch.no_grad():
        for name in names:
            if name == "__base__":
                with model.disable_adapter():
                    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            else:
                model.set_adapter(name)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            out.append(F.log_softmax(logits.float(), -1))
    model.set_adapter(NAMES[0])
    return torch.stack(out, 1)


# -- pure rules -------------------------------------------------------------------------------------------


def test_mixtures_are_distributions_and_one_hot_weight_is_that_expert():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 11) * 3  # (B, K, V)
    alpha = torch.softmax(torch.randn(4, 3), -1)
    for out in (mix_prob(logits, alpha), mix_uniform(logits), mix_logit(logits, torch.randn(4, 3))):
        assert torch.allclose(out.exp().sum(-1), torch.ones(4), atol=1e-5)
    one_hot = torch.tensor([[0.0, 1.0, 0.0]]).expand(4, 3)
    assert torch.allclose(mix_prob(logits, one_hot), F.log_softmax(logits[:, 1], -1), atol=1e-6)
    assert torch.allclose(mix_logit(logits, one_hot), F.log_softmax(logits[:, 1], -1), atol=1e-6)
    naive = torch.log((alpha[:, :, None] * logits.softmax(-1)).sum(1))
    assert torch.allclose(mix_prob(logits, alpha), naive, atol=1e-5)
    assert torch.allclose(mix_logprobs(logits, None, MixRule.UNIFORM), torch.log(logits.softmax(-1).mean(1)),
                          atol=1e-5)


def test_prob_mixing_is_stable_and_has_finite_gradients_at_zero_weight():
    lp = torch.tensor([[-1.0, -200.0]])  # far beyond float32 exp range
    alpha = torch.tensor([[0.0, 1.0]], requires_grad=True)
    out = mixture_token_logprob(lp, alpha)
    assert out.item() == pytest.approx(-200.0)
    out.backward()
    assert torch.isfinite(alpha.grad).all()
    alpha2 = torch.tensor([[0.5, 0.5]], requires_grad=True)
    mixture_token_logprob(lp, alpha2).backward()
    assert alpha2.grad[0].tolist() == pytest.approx([2.0, 0.0], abs=1e-6)  # d/da log(sum a p) = p / mix


def test_mixing_errors_are_specific():
    logits = torch.randn(2, 3, 5)
    with pytest.raises(ConfigError, match="sum to 1"):
        mix_prob(logits, torch.full((2, 3), 0.5))
    with pytest.raises(ConfigError, match="non-negative"):
        mix_prob(logits, torch.tensor([[1.5, -0.5, 0.0]] * 2))
    with pytest.raises(ConfigError, match=r"\(B, K\)"):
        mix_prob(logits, torch.full((2, 2), 0.5))
    with pytest.raises(ConfigError, match="uniform"):
        MixRule.parse("geometric")


# -- engine -----------------------------------------------------------------------------------------------


def test_one_pass_scoring_equals_switching_adapters_and_merged_models(peft_model, merged, batch, tok):
    ids, mask = batch
    response = torch.randint(3, len(tok), (3, 5))
    rmask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    names = NAMES + ["__base__"]
    got = score_responses(Experts.from_adapters(peft_model, names), ids, mask, response, rmask)  # (B, T, K)
    ref = _expert_logprobs_by_switching(peft_model, torch.cat([ids, response], 1),
                                        torch.cat([mask, rmask], 1), names)  # (B, K, S, V)
    ref = ref[:, :, ids.shape[1] - 1 : -1].gather(-1, response[:, None, :, None].expand(-1, 4, -1, 1))
    ref = ref.squeeze(-1).transpose(1, 2) * rmask[..., None]
    assert torch.allclose(got, ref, atol=1e-5)
    assert (got[:, :, 0] - got[:, :, 1]).abs().max() > 1e-3  # the experts really differ
    black_box = score_responses(Experts.from_models(merged, [tok] * 3), ids, mask, response, rmask)
    assert torch.allclose(black_box, got[:, :, :3], atol=1e-4)


def test_weight_one_reproduces_the_adapter_alone(peft_model, batch, tok):
    ids, mask = batch
    experts = Experts.from_adapters(peft_model, NAMES)
    for j, name in enumerate(NAMES):
        w = [0.0] * 3
        w[j] = 1.0
        out = generate_mixed(experts, ids, mask, FixedWeights(w), eos_token_ids=_eos(tok), sampling=GREEDY)
        peft_model.set_adapter(name)
        with torch.no_grad():
            ref = peft_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                                      eos_token_id=_eos(tok), pad_token_id=tok.pad_token_id)
        assert torch.equal(out.tokens, ref[:, ids.shape[1]:])
        assert torch.allclose(out.logprobs, out.expert_logprobs[:, :, j], atol=1e-6)
    peft_model.set_adapter(NAMES[0])


def test_kv_cached_steps_equal_full_recompute_and_padded_rows_equal_alone(peft_model, batch, tok):
    ids, mask = batch
    experts = Experts.from_adapters(peft_model, NAMES)
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=3)
    out = generate_mixed(experts, ids, mask, FixedWeights([0.2, 0.5, 0.3]), eos_token_ids=[0], sampling=cfg)
    full = score_responses(experts, ids, mask, out.tokens, out.mask)  # no cache
    assert torch.allclose(out.expert_logprobs, full, atol=1e-5)
    greedy = generate_mixed(experts, ids, mask, FixedWeights([0.2, 0.5, 0.3]), eos_token_ids=[0], sampling=GREEDY)
    for i, prompt in enumerate(PROMPTS):
        one = tok([prompt], return_tensors="pt")
        alone = generate_mixed(experts, one["input_ids"], one["attention_mask"], FixedWeights([0.2, 0.5, 0.3]),
                               eos_token_ids=[0], sampling=GREEDY)
        assert torch.equal(alone.tokens[0], greedy.tokens[i])
        assert torch.allclose(alone.expert_logprobs[0], greedy.expert_logprobs[i], atol=1e-5)


def test_adapters_on_one_base_equal_separate_merged_models(peft_model, merged, batch, tok):
    ids, mask = batch
    w = FixedWeights([0.6, 0.1, 0.3])
    one_base = generate_mixed(Experts.from_adapters(peft_model, NAMES), ids, mask, w, eos_token_ids=[0],
                              sampling=GREEDY)
    separate = generate_mixed(Experts.from_models(merged), ids, mask, w, eos_token_ids=[0], sampling=GREEDY)
    assert torch.equal(one_base.tokens, separate.tokens)
    assert torch.allclose(one_base.expert_logprobs, separate.expert_logprobs, atol=1e-4)


def test_sequence_logprob_matches_naive_mixture_and_reweights(peft_model, batch, tok):
    ids, mask = batch
    experts = Experts.from_adapters(peft_model, NAMES)
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=7)

    class Alternating:  # per-token weights that depend on the step: a stand-in for a learned controller
        def __call__(self, ctx: StepContext) -> torch.Tensor:
            w = torch.tensor([0.7, 0.2, 0.1]) if ctx.step % 2 == 0 else torch.tensor([0.1, 0.3, 0.6])
            return w.expand(ctx.prompt_ids.shape[0], 3)

    out = generate_mixed(experts, ids, mask, Alternating(), eos_token_ids=[0], sampling=cfg)
    probs = _expert_logprobs_by_switching(peft_model, torch.cat([ids, out.tokens], 1),
                                          torch.cat([mask, out.mask], 1), NAMES).exp()  # (B, K, S, V)
    t = out.tokens.shape[1]
    naive = torch.zeros(3)
    for b in range(3):
        for s in range(t):
            if out.mask[b, s]:
                p = (out.weights[b, s][:, None] * probs[b, :, ids.shape[1] - 1 + s]).sum(0)  # (V,)
                naive[b] += torch.log(p[out.tokens[b, s]])
    assert torch.allclose(out.sequence_logprob(), naive, atol=1e-4)
    assert torch.allclose(out.sequence_logprob(out.weights), naive, atol=1e-4)
    # New weights, differentiable, without running the experts again.
    logits = torch.zeros(3, 3, requires_grad=True)
    new = out.sequence_logprob(torch.softmax(logits, -1))
    new.sum().backward()
    assert logits.grad.abs().sum() > 0
    fixed = mixture_sequence_logprob(out.expert_logprobs, torch.full((3, 3), 1 / 3), out.mask)
    assert torch.allclose(new.detach(), fixed, atol=1e-5)


def test_seed_reproducible_and_eos_stops_a_row(peft_model, batch, tok):
    ids, mask = batch
    experts = Experts.from_adapters(peft_model, NAMES)
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.95, repetition_penalty=1.0, seed=5)
    w = FixedWeights([1 / 3] * 3)
    first = generate_mixed(experts, ids, mask, w, eos_token_ids=[0], sampling=cfg)
    again = generate_mixed(experts, ids, mask, w, eos_token_ids=[0], sampling=cfg)
    other = generate_mixed(experts, ids, mask, w, eos_token_ids=[0], sampling=cfg.__class__(
        max_new_tokens=10, temperature=1.0, top_p=0.95, repetition_penalty=1.0, seed=6))
    assert torch.equal(first.tokens, again.tokens)
    assert not torch.equal(first.tokens, other.tokens)
    # End at the token row 0 chose third: row 0 stops there and is padded; rows without it run on unchanged.
    stop = int(first.tokens[0, 2])
    ended = generate_mixed(experts, ids, mask, w, eos_token_ids=[stop], pad_token_id=1, sampling=cfg)
    first_hit = int((first.tokens[0] == stop).nonzero()[0])
    assert ended.mask[0].tolist() == [1] * (first_hit + 1) + [0] * (ended.tokens.shape[1] - first_hit - 1)
    assert (ended.tokens[0, first_hit + 1 :] == 1).all()
    assert (ended.expert_logprobs[0, first_hit + 1 :] == 0).all()
    for b in range(3):
        if stop not in first.tokens[b].tolist():
            assert torch.equal(ended.tokens[b], first.tokens[b])


def test_all_rows_finished_stops_early_and_sampling_knobs(peft_model, batch, tok):
    ids, mask = batch
    experts = Experts.from_adapters(peft_model, NAMES)
    w = FixedWeights([0.5, 0.25, 0.25])
    greedy = generate_mixed(experts, ids, mask, w, eos_token_ids=[0], sampling=GREEDY)
    stops = sorted({int(greedy.tokens[b, 0]) for b in range(3)})
    early = generate_mixed(experts, ids, mask, w, eos_token_ids=stops, sampling=GREEDY)
    assert early.tokens.shape == (3, 1) and early.mask.all()
    # top_p that keeps only the best token is greedy decoding.
    nucleus = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=1e-6, repetition_penalty=1.0, seed=1)
    assert torch.equal(generate_mixed(experts, ids, mask, w, eos_token_ids=[0], sampling=nucleus).tokens,
                       greedy.tokens)


@pytest.mark.parametrize("penalty", [1.3, 3.0])
def test_repetition_penalty_of_identical_experts_is_transformers_penalty(peft_model, tok, penalty):
    """The penalty acts on each expert's logits as transformers' does on one model's: a mixture of three
    copies of one expert decodes exactly what that expert decodes under generate(repetition_penalty)."""
    experts = Experts.from_adapters(peft_model, [NAMES[1]] * 3)
    cfg = SamplingConfig(max_new_tokens=10, temperature=0, repetition_penalty=penalty)
    plain = SamplingConfig(max_new_tokens=10, temperature=0, repetition_penalty=1.0)
    changed = False
    for prompt in PROMPTS:  # one prompt at a time: transformers also penalises the padding id
        enc = tok([prompt], return_tensors="pt")
        ours = generate_mixed(experts, enc["input_ids"], enc["attention_mask"], FixedWeights([0.2, 0.3, 0.5]),
                              eos_token_ids=[-1], sampling=cfg)
        peft_model.set_adapter(NAMES[1])
        with torch.no_grad():
            ref = peft_model.generate(**enc, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                      repetition_penalty=penalty, pad_token_id=0)
        assert ours.tokens[0].tolist() == ref[0, enc["input_ids"].shape[1]:].tolist(), prompt
        free = generate_mixed(experts, enc["input_ids"], enc["attention_mask"], FixedWeights([0.2, 0.3, 0.5]),
                              eos_token_ids=[-1], sampling=plain)
        changed |= not torch.equal(free.tokens, ours.tokens)
    peft_model.set_adapter(NAMES[0])
    assert changed  # the penalty did something on this tiny model


def test_base_expert_and_logit_and_uniform_rules(peft_model, batch, tok):
    ids, mask = batch
    experts = Experts.from_adapters(peft_model, ["__base__", "p1a"])
    base_only = generate_mixed(experts, ids, mask, FixedWeights([1.0, 0.0]), eos_token_ids=[0], sampling=GREEDY)
    with peft_model.disable_adapter(), torch.no_grad():
        ref = peft_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                                  eos_token_id=[0], pad_token_id=tok.pad_token_id)
    assert torch.equal(base_only.tokens, ref[:, ids.shape[1]:])
    logit = generate_mixed(experts, ids, mask, FixedWeights([0.0, 1.0]), rule=MixRule.LOGIT, eos_token_ids=[0],
                           sampling=GREEDY)
    a_only = generate_mixed(experts, ids, mask, FixedWeights([0.0, 1.0]), eos_token_ids=[0], sampling=GREEDY)
    assert torch.equal(logit.tokens, a_only.tokens)
    with pytest.raises(ConfigError, match="logit-rule"):
        logit.sequence_logprob(torch.full((3, 2), 0.5))
    uniform = generate_mixed(experts, ids, mask, rule=MixRule.UNIFORM, eos_token_ids=[0], sampling=GREEDY)
    assert torch.allclose(uniform.weights, torch.full_like(uniform.weights, 0.5))


def test_engine_errors_name_the_problem(peft_model, batch, tok):
    ids, mask = batch
    experts = Experts.from_adapters(peft_model, NAMES)
    with pytest.raises(ConfigError, match=r"expected \(B, K\) = \(3, 3\)"):
        generate_mixed(experts, ids, mask, FixedWeights([0.5, 0.5]), eos_token_ids=[0], sampling=GREEDY)
    with pytest.raises(ConfigError, match="sum to 1"):
        generate_mixed(experts, ids, mask, FixedWeights([0.5, 0.5, 0.5]), eos_token_ids=[0], sampling=GREEDY)
    with pytest.raises(ConfigError, match="left-padded"):
        generate_mixed(experts, ids, mask.flip(-1), FixedWeights([1, 0, 0]), eos_token_ids=[0], sampling=GREEDY)
    with pytest.raises(ConfigError, match="not loaded"):
        Experts.from_adapters(peft_model, ["p1a", "zz"])
    with pytest.raises(ModelError, match="peft model"):
        Experts.from_adapters(build_tiny_model(tok), ["p1a"])
    with pytest.raises(ConfigError, match="vocabulary sizes"):
        small = build_tiny_model(tok)
        small.resize_token_embeddings(len(tok) + 8)
        Experts.from_models([build_tiny_model(tok), small])
    other_tok = build_tiny_tokenizer()
    other_tok.add_tokens(["<extra>"])
    with pytest.raises(ConfigError, match="different tokenizer"):
        Experts.from_models([build_tiny_model(tok)] * 2, [tok, other_tok])
    with peft_model.disable_adapter(), pytest.raises(ModelError, match="disabled"):
        # peft would silently run every row as the base model here
        generate_mixed(experts, ids, mask, FixedWeights([1, 0, 0]), eos_token_ids=[0], sampling=GREEDY)
    with pytest.raises(ConfigError, match="one weight per expert"):
        mixture_token_logprob(torch.zeros(2, 3), torch.full((2, 2), 0.5))
    peft_model.train()
    try:
        with pytest.raises(ModelError, match="eval"):
            generate_mixed(experts, ids, mask, FixedWeights([1, 0, 0]), eos_token_ids=[0], sampling=GREEDY)
    finally:
        peft_model.eval()


def test_stacked_lora_equals_peft_mixed_batch_with_unequal_ranks_and_tracks_changes(tok, batch, monkeypatch):
    """The two-bmm path (used for plain LoRA Linears) equals peft's own mixed-adapter batch, with experts
    of different ranks, an expert missing from some modules, and the base; and sees in-place edits."""
    from peft import LoraConfig, get_peft_model

    from personalign import experts as runtime

    model = get_peft_model(build_tiny_model(tok, seed=3), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]),
                           adapter_name="small")
    model.add_adapter("big", LoraConfig(r=6, lora_alpha=3, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.eval()
    ids, mask = batch
    response = torch.randint(3, len(tok), (3, 4))
    rmask = torch.ones_like(response)
    experts = Experts.from_adapters(model, ["small", "big", "__base__"])
    assert experts._stacked() is not None  # plain LoRA Linears: the stacked path runs
    fast = score_responses(experts, ids, mask, response, rmask)
    monkeypatch.setattr(runtime, "stack_lora", lambda *a: None)  # force peft's adapter_names path
    slow = score_responses(Experts.from_adapters(model, ["small", "big", "__base__"]), ids, mask, response, rmask)
    assert torch.allclose(fast, slow, atol=1e-5)
    monkeypatch.undo()
    with torch.no_grad():  # an in-place change of a factor rebuilds the stacks
        next(p for n, p in model.named_parameters() if "lora_B.big" in n).mul_(3)
    changed = score_responses(experts, ids, mask, response, rmask)
    assert not torch.allclose(changed[:, :, 1], fast[:, :, 1], atol=1e-4)
    assert torch.allclose(changed[:, :, 2], fast[:, :, 2], atol=1e-6)  # the base is untouched
    assert not hasattr(model.base_model.model.model.layers[0].self_attn.q_proj, "__dict__") or \
        "forward" not in model.base_model.model.model.layers[0].self_attn.q_proj.__dict__  # patch removed


class _RowWeights:
    """Fixed per-row weights with zeros outside each row's experts; ``active`` optional."""

    def __init__(self, w, with_active: bool):
        self.w = torch.tensor(w)
        if with_active:
            self.active = lambda rows, device: self.w.to(device) > 0

    def __call__(self, ctx):
        return self.w.to(ctx.prompt_ids.device)


def test_inactive_experts_are_not_run_and_change_nothing(peft_model, batch, tok):
    """Rows run only their provider's active experts (fewer rows per step); tokens and the active
    experts' log-probs equal those of running every expert."""
    ids, mask = batch
    w = [[0.7, 0.3, 0.0], [0.0, 0.4, 0.6], [0.5, 0.0, 0.5]]  # unequal groups: experts 0, 1, 2 on 2 rows each
    experts = Experts.from_adapters(peft_model, NAMES)
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=5)
    everyone = generate_mixed(experts, ids, mask, _RowWeights(w, False), eos_token_ids=[0], sampling=cfg)
    rows_seen = []
    real = peft_model.forward
    peft_model.forward = lambda *a, **k: rows_seen.append(k["input_ids"].shape[0]) or real(*a, **k)
    try:
        subset = generate_mixed(experts, ids, mask, _RowWeights(w, True), eos_token_ids=[0], sampling=cfg)
    finally:
        del peft_model.forward
    assert set(rows_seen) == {6}  # 6 (prompt, expert) rows instead of 9
    assert torch.equal(subset.tokens, everyone.tokens)
    assert torch.allclose(subset.logprobs, everyone.logprobs, atol=1e-5)
    on = torch.tensor(w) > 0
    assert torch.allclose(subset.expert_logprobs[on[:, None, :].expand_as(subset.expert_logprobs)],
                          everyone.expert_logprobs[on[:, None, :].expand_as(everyone.expert_logprobs)], atol=1e-5)
    # A provider that weights an expert it declared inactive is refused (that expert was never run).
    bad = _RowWeights(w, True)
    bad.active = lambda rows, device: torch.tensor([[True, False, False]] * 3)
    with pytest.raises(ConfigError, match="outside its active experts"):
        generate_mixed(experts, ids, mask, bad, eos_token_ids=[0], sampling=cfg)
