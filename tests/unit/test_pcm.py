"""The Preference Control Model on a tiny random llama with random LoRA experts: valid weights, a forced PCM
equals its expert, recorded features reproduce the sampling weights, D(y) against a direct computation,
gradients reach the PCM only, save/load and its refusals, and the pure utility and KL functions."""

from __future__ import annotations

import json
import math

import pytest
import torch

from personalign.errors import ConfigError, ModelError, PreferenceError
from personalign.generation import SamplingConfig, StepContext
from personalign.experts import Experts, score_responses
from personalign.mixture import FixedWeights, generate_mixed
from personalign.pcm import (
    PCMConfig,
    PCMInputs,
    PCMWeights,
    PreferenceControlModel,
    expert_features,
    pcm_sequence_logprob,
    preference_utility,
    preference_vector,
    read_pcm_config,
    weight_kl,
)
from personalign.preferences import parse_preference

SIDES = ("P1A", "P2A", "P3A")


def _peft_experts(model, sides=SIDES, scale=0.5):
    """One peft model holding a random LoRA expert per side (lora_B random, so each differs from the base)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"])
    peft_model = get_peft_model(model, cfg, adapter_name=sides[0])
    for s in sides[1:]:
        peft_model.add_adapter(s, cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return peft_model.eval()


def _randomize(pcm: PreferenceControlModel, seed: int = 0, std: float = 0.5) -> PreferenceControlModel:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pcm.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return pcm


def _batch(tok, texts=("Explain photosynthesis to me.", "Hi")):
    tok.padding_side = "left"
    enc = tok([tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                       add_generation_prompt=True) for t in texts],
              return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def _pcm(model, context=True, sides=SIDES):
    return PreferenceControlModel(PCMConfig(sides, model.config.hidden_size, context, hidden=16, proj=8),
                                  base={"name": model.config.personalign_base, "model_type": "llama",
                                        "hidden_size": model.config.hidden_size,
                                        "num_hidden_layers": model.config.num_hidden_layers,
                                        "vocab_size": model.config.vocab_size})


@pytest.fixture()
def setup(tiny):
    model, tok = tiny
    embeddings = model.get_input_embeddings().weight.detach().clone()
    peft_model = _peft_experts(model)
    return peft_model, tok, embeddings


def _generate(peft_model, tok, provider, sampling, texts=None):
    ids, mask = _batch(tok) if texts is None else _batch(tok, texts)
    return generate_mixed(provider.experts, ids, mask, provider, eos_token_ids=[tok.eos_token_id],
                          sampling=sampling)


# -- the model --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("context", [True, False])
def test_weights_are_distributions_zero_on_inactive_sides(tiny, context):
    model, _ = tiny
    pcm = _pcm(model, context)
    pref = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    b, t, h = 3, 4, model.config.hidden_size
    inputs = PCMInputs(pref, torch.rand(b, t, pcm.config.n_scalars), torch.randn(b, h), torch.randn(b, t, h))
    # A fresh PCM is the declared mix exactly: its output layer starts at zero.
    torch.testing.assert_close(pcm.weights(inputs, t), pref[:, None].expand(b, t, 3))
    w = _randomize(pcm).weights(inputs, t)  # (B, T, S)
    assert w.shape == (b, t, 3)
    assert bool((w >= 0).all()) and torch.allclose(w.sum(-1), torch.ones(b, t))
    assert bool((w[pref[:, None].expand_as(w) == 0] == 0).all())  # exactly zero, not just small
    assert not torch.allclose(w, pref[:, None].expand_as(w))
    if context:  # the context moves the weights from token to token
        assert not torch.allclose(w[:, 0], w[:, 1])
    with pytest.raises(PreferenceError, match="no side with positive weight"):
        pcm(PCMInputs(torch.zeros(1, 3), inputs.scalars[:1], inputs.prompt_emb[:1], inputs.gen_emb[:1]))
    with pytest.raises(ConfigError, match="expected \\(B, 3\\)"):
        pcm(PCMInputs(torch.ones(1, 4)))


def test_expert_features_have_the_documented_values():
    v = 10
    uniform = torch.zeros(1, 1, v)  # log-probs of a uniform distribution, up to a shift
    peaked = torch.full((1, 1, v), -30.0)
    peaked[..., 3] = 0.0
    logp = torch.log_softmax(torch.cat([uniform, peaked], 1), -1)  # (1, 2, V)
    f = expert_features(logp, torch.tensor([[0.5, 0.5]]))  # (1, 2, 3)
    assert f[0, 0, 0].item() == pytest.approx(1.0) and f[0, 0, 1].item() == pytest.approx(0.1)
    assert f[0, 1, 0].item() == pytest.approx(0.0, abs=1e-6) and f[0, 1, 1].item() == pytest.approx(1.0)
    # KL(peaked || mix) = log(1 / (0.5 + 0.05)); squashed to kl / (1 + kl).
    kl = math.log(1 / 0.55)
    assert f[0, 1, 2].item() == pytest.approx(kl / (1 + kl), rel=1e-4)
    same = expert_features(torch.cat([uniform, uniform], 1).log_softmax(-1), torch.tensor([[1.0, 0.0]]))
    assert same[..., 2].abs().max().item() < 1e-6  # identical experts never disagree
    assert bool(((f >= 0) & (f <= 1)).all())


def test_preference_vector_and_its_refusals():
    v = preference_vector(parse_preference("concise=0.6,elementary=0.2"), SIDES)
    assert v.tolist() == pytest.approx([0.25, 0.75, 0.0])
    assert preference_vector(parse_preference("1A,2A,3A"), SIDES).tolist() == pytest.approx([1 / 3] * 3)
    with pytest.raises(PreferenceError, match="non-negative"):
        preference_vector(parse_preference("concise=0.6,elementary=-0.2"), SIDES)
    with pytest.raises(PreferenceError, match="P1B.*not among"):
        preference_vector(parse_preference("1B,2A"), SIDES)


def test_utility_and_weight_kl_hand_computed():
    r = torch.tensor([[1.0, 2.0, float("nan")], [0.0, 0.0, 3.0]])
    r_ref = torch.tensor([[0.0, 2.0, 5.0], [1.0, 1.0, 1.0]])
    w = torch.tensor([[0.25, 0.75, 0.0], [0.0, 0.0, 1.0]])
    u = preference_utility(r, r_ref, w, torch.tensor([2.0, 1.0, 4.0]))
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert u.tolist() == pytest.approx([0.25 * sig(0.5) + 0.75 * 0.5, sig(0.5)])
    alpha = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]])  # (1, 2, 3)
    prior = torch.tensor([[0.25, 0.75, 0.0]])
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert weight_kl(alpha, prior, torch.tensor([[1, 0]])).item() == pytest.approx(kl0)
    assert weight_kl(alpha, prior, torch.tensor([[1, 1]])).item() == pytest.approx((kl0 + math.log(4)) / 2)
    # Zero weights (inactive sides, or an active side driven to 0) give finite gradients, not NaN.
    logits = torch.tensor([[[0.0, 0.0, -torch.inf], [0.0, -200.0, -torch.inf]]], requires_grad=True)
    weight_kl(logits.softmax(-1), prior, torch.ones(1, 2)).backward()
    assert torch.isfinite(logits.grad).all()


# -- with experts ----------------------------------------------------------------------------------------


def test_pcm_forced_onto_one_expert_reproduces_its_greedy_tokens(setup):
    peft_model, tok, emb = setup
    pcm = _pcm(peft_model.base_model.model)
    with torch.no_grad():
        pcm.mlp[-1].bias.copy_(torch.tensor([-60.0, 60.0, -60.0]))  # everything on P2A
    greedy = SamplingConfig(max_new_tokens=8, temperature=0, repetition_penalty=1.0)
    provider = PCMWeights(pcm, Experts.from_adapters(peft_model, SIDES), emb, parse_preference("1A,2A,3A"))
    got = _generate(peft_model, tok, provider, greedy)
    alone = Experts.from_adapters(peft_model, ["P2A"])
    ids, mask = _batch(tok)
    want = generate_mixed(alone, ids, mask, FixedWeights([1.0]), eos_token_ids=[tok.eos_token_id],
                          sampling=greedy)
    assert torch.equal(got.tokens, want.tokens)
    other = generate_mixed(Experts.from_adapters(peft_model, ["P1A"]), ids, mask, FixedWeights([1.0]),
                           eos_token_ids=[tok.eos_token_id], sampling=greedy)
    assert not torch.equal(other.tokens, want.tokens)  # the experts differ, so the match means something
    assert torch.equal(got.weights[..., 1], torch.ones_like(got.weights[..., 1]))
    # Inference loads only the preference's experts: a 2-side preference over 2 of the 3 known sides.
    two = PCMWeights(pcm, Experts.from_adapters(peft_model, ["P2A", "P3A"]), emb, parse_preference("2A,3A"))
    assert torch.equal(_generate(peft_model, tok, two, greedy).tokens, want.tokens)


def test_recorded_features_reproduce_the_sampling_weights_and_d_is_direct(setup):
    peft_model, tok, emb = setup
    pcm = _randomize(_pcm(peft_model.base_model.model), seed=1, std=0.3)
    experts = Experts.from_adapters(peft_model, SIDES)
    pref = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    provider = PCMWeights(pcm, experts, emb, pref, record=True)
    # Row 0 never weights side 2, so the mixture does not run that expert for it (5 rows, not 6).
    assert provider.active(2, torch.device("cpu")).tolist() == [[True, True, False], [True, True, True]]
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=3)
    gen = _generate(peft_model, tok, provider, sampling)
    inputs = provider.recorded()
    index = torch.arange(3)
    mask = gen.mask.float()
    assert inputs.scalars.shape == (2, gen.tokens.shape[1], pcm.config.n_scalars)
    assert bool((gen.weights[0, :, 2] == 0).all())  # the inactive side never gets weight
    with torch.no_grad():
        logp0, alpha0 = pcm_sequence_logprob(pcm, inputs, gen.expert_logprobs, index, mask)
    torch.testing.assert_close(alpha0, gen.weights, atol=1e-6, rtol=1e-5)  # features -> the same weights
    torch.testing.assert_close(logp0, gen.sequence_logprob(), atol=1e-4, rtol=1e-5)

    # Change the PCM, then D(y) = log pi_new(y) - log pi_old(y) from the record versus a direct sum with
    # expert log-probs from a teacher-forced pass and the new weights re-run through the PCM in float64.
    _randomize(pcm, seed=2, std=0.3)
    with torch.no_grad():
        logp1, _ = pcm_sequence_logprob(pcm, inputs, gen.expert_logprobs, index, mask)
        d = logp1 - gen.sequence_logprob(gen.weights)
        ids, am = _batch(tok)
        lp = score_responses(experts, ids, am, gen.tokens, gen.mask).double()  # (B, T, K)
        as64 = PCMInputs(inputs.pref.double(), inputs.scalars.double(), inputs.prompt_emb.double(),
                         inputs.gen_emb.double())
        new_alpha = pcm.double().weights(as64, gen.tokens.shape[1])
    pcm.float()
    for b in range(2):
        direct = 0.0
        for t in range(gen.tokens.shape[1]):
            if gen.mask[b, t]:
                p = lp[b, t].exp()
                new, old = float((new_alpha[b, t] * p).sum()), float((gen.weights[b, t] * p).sum())
                direct += math.log(new) - math.log(old)
        assert d[b].item() == pytest.approx(direct, abs=2e-4)
    assert d.abs().max() > 1e-3  # the change did change the log-probs


def test_rebel_gradient_reaches_only_the_pcm(setup):
    from personalign.losses import rebel_loss

    peft_model, tok, emb = setup
    pcm = _randomize(_pcm(peft_model.base_model.model), seed=4, std=0.3)
    experts = Experts.from_adapters(peft_model, SIDES)
    pref = torch.tensor([[0.5, 0.5, 0.0]]).repeat(2, 1)
    provider = PCMWeights(pcm, experts, emb, pref, record=True)
    ids, mask = _batch(tok, ["Compare stocks and bonds."] * 2)
    sampling = SamplingConfig(max_new_tokens=5, temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=5)
    gen = generate_mixed(experts, ids, mask, provider, eos_token_ids=[tok.eos_token_id],
                         sampling=sampling)
    expert_before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    opt = torch.optim.AdamW(pcm.parameters(), lr=0.1)
    logp, _ = pcm_sequence_logprob(pcm, provider.recorded(), gen.expert_logprobs, torch.arange(3),
                                   gen.mask.float())
    old = gen.sequence_logprob(gen.weights)
    loss = rebel_loss(logp[:1], old[:1], logp[1:], old[1:], torch.tensor([1.0]), torch.tensor([0.0]), eta=1.0)
    loss.backward()
    assert all(p.grad is not None for p in pcm.parameters())
    assert pcm.mlp[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in peft_model.parameters())
    opt.step()
    assert all(torch.equal(p, expert_before[n]) for n, p in peft_model.named_parameters())


def test_provider_refuses_the_wrong_experts_and_uncovered_sides(setup):
    peft_model, tok, emb = setup
    pcm = _pcm(peft_model.base_model.model)
    experts = Experts.from_adapters(peft_model, ["P1A", "P2A"])
    provider = PCMWeights(pcm, experts, emb, parse_preference("1A,2A"))
    ids, mask = _batch(tok)
    bare = StepContext(0, ids, mask, ids[:, :0], torch.zeros(ids.shape[0], dtype=torch.bool))
    with pytest.raises(ConfigError, match="next-token log-probabilities"):
        provider(bare)  # a context without the experts' distributions: not from the mixture step
    with pytest.raises(PreferenceError, match="no expert loaded for side.*P3A"):
        PCMWeights(pcm, experts, emb, parse_preference("1A,2A,3A"))
    with pytest.raises(PreferenceError, match="not P1B"):
        PCMWeights(pcm, Experts([peft_model], ["P1B"], adapters=True), emb, torch.tensor([1.0, 0.0, 0.0]))


# -- persistence -----------------------------------------------------------------------------------------


def test_save_load_round_trip_and_refusals(tiny, tiny_model_dir, tmp_path):
    from conftest import build_tiny_model, build_tiny_tokenizer

    model, _ = tiny
    pcm = _randomize(_pcm(model), seed=9)
    pcm.save(tmp_path / "pcm", extra={"metrics": {"a": 1.0}})
    doc = json.loads((tmp_path / "pcm" / "pcm.json").read_text())
    assert doc["kind"] == "pcm" and doc["sides"] == list(SIDES) and doc["metrics"] == {"a": 1.0}
    assert doc["architecture"]["hidden"] == 16 and doc["base"]["name"] == str(tiny_model_dir)

    back = PreferenceControlModel.load(tmp_path / "pcm", base_model=model, sides=["P1A", "P3A"])
    h = model.config.hidden_size
    inputs = PCMInputs(torch.tensor([[0.2, 0.3, 0.5]]), torch.rand(1, 2, pcm.config.n_scalars),
                       torch.randn(1, h), torch.randn(1, 2, h))
    assert torch.equal(back.weights(inputs, 2), pcm.weights(inputs, 2))
    assert back.config == pcm.config

    with pytest.raises(PreferenceError, match="not P1B.*train-pcm"):
        PreferenceControlModel.load(tmp_path / "pcm", sides=["P1A", "P1B"])
    assert read_pcm_config(tmp_path / "pcm", ["P2A"])["sides"] == list(SIDES)  # the pre-load check
    with pytest.raises(PreferenceError, match="not P3D"):
        read_pcm_config(tmp_path / "pcm", ["P3D"])
    other = build_tiny_model(build_tiny_tokenizer(), layers=3)  # another base: a different fingerprint
    with pytest.raises(ModelError, match="num_hidden_layers"):
        PreferenceControlModel.load(tmp_path / "pcm", base_model=other)
    model.config.personalign_base = "some-other-model"  # same shape, another name
    with pytest.raises(ModelError, match="trained on base model"):
        PreferenceControlModel.load(tmp_path / "pcm", base_model=model)
    with pytest.raises(ModelError, match="not a PCM folder"):
        PreferenceControlModel.load(tmp_path)
    (tmp_path / "pcm" / "pcm.json").write_text(json.dumps({**doc, "architecture": {**doc["architecture"],
                                                                                   "hidden": 8}}))
    with pytest.raises(ModelError, match="does not fit"):
        PreferenceControlModel.load(tmp_path / "pcm")


def test_shipped_pcm_is_found_through_the_weights_entry_point(tmp_path, shipped_weights):
    from personalign.models import EMBEDDED_DEFAULT
    from personalign.pcm import PCM_CONFIG, PCM_WEIGHTS, resolve_pcm_dir, shipped_pcm_dir

    shipped_weights({})  # no weights distribution installed
    assert shipped_pcm_dir(EMBEDDED_DEFAULT) is None
    with pytest.raises(ConfigError, match=f"no PCM is shipped for model '{EMBEDDED_DEFAULT}'; train one"):
        resolve_pcm_dir("shipped", EMBEDDED_DEFAULT)
    folder = tmp_path / "dist" / "pcm"
    folder.mkdir(parents=True)
    shipped_weights({EMBEDDED_DEFAULT: {"experts": None, "pcm": folder}})
    (folder / PCM_WEIGHTS).write_bytes(b"")
    assert shipped_pcm_dir(EMBEDDED_DEFAULT) is None  # incomplete: pcm.json is written last
    (folder / PCM_CONFIG).write_text("{}")
    assert shipped_pcm_dir(EMBEDDED_DEFAULT) == folder == resolve_pcm_dir("shipped", EMBEDDED_DEFAULT)
    assert shipped_pcm_dir("/some/local/model") is None  # no distribution ships for it
    assert resolve_pcm_dir(tmp_path / "mine", EMBEDDED_DEFAULT) == tmp_path / "mine"
