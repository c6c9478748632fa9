from __future__ import annotations

import json
import math
import random

import pytest
import torch

from personalign.checkpoint import load_checkpoint, save_checkpoint
from personalign.errors import ConfigError, DataError, ModelError
from personalign.losses import bradley_terry_loss, pairwise_accuracy
from personalign.reward_model import RewardModel, last_token_index


def test_bradley_terry_loss_hand_computed():
    chosen = torch.tensor([1.0, 0.0, 3.0])
    rejected = torch.tensor([0.0, 2.0, 3.0])
    # -log sigmoid(1) = 0.3132617, -log sigmoid(-2) = 2.1269280, -log sigmoid(0) = log 2
    expected = (0.3132617 + 2.1269280 + math.log(2)) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-6)
    # Stable for huge margins.
    assert torch.isfinite(bradley_terry_loss(torch.tensor([-1e4]), torch.tensor([1e4])))
    assert bradley_terry_loss(torch.tensor([-1e4]), torch.tensor([1e4])).item() == pytest.approx(2e4)
    with pytest.raises(ValueError, match="differ in shape"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))


def test_bradley_terry_gradient():
    c = torch.tensor([0.5], requires_grad=True)
    r = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(c, r).backward()
    # d/dc -log sigmoid(c - r) = -(1 - sigmoid(c - r))
    assert c.grad.item() == pytest.approx(-(1 - 1 / (1 + math.exp(-0.5))), abs=1e-6)
    assert r.grad.item() == pytest.approx(-c.grad.item())


def test_pairwise_accuracy_ties_half():
    assert pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.tensor([0.0, 1.0, 2.0, 0.5])) == 0.625


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(left).tolist() == [3, 3]


@pytest.fixture()
def rm(tiny):
    base, tok = tiny
    return RewardModel(base, tok, ["P2A", "P2B"], side_prompts={"P2A": "Be brief.", "P2B": "Be detailed."},
                       side_prompt_in_input=True)


def test_reward_ignores_padding(rm):
    """A sequence's reward is the same alone and in a batch with a longer one."""
    texts = [rm.format("Hi", "short"), rm.format("Explain rain", "water " * 30)]
    alone = rm(**rm.encode(texts[:1]))
    batch = rm(**rm.encode(texts))
    assert torch.allclose(alone[0], batch[0], atol=1e-5)


def test_format_uses_side_prompt_and_eos(rm):
    text = rm.format("Explain rain.", "It rains.", side="P2A")
    assert "Explain rain. Be brief.<|im_end|>" in text
    assert text.endswith("It rains.<|im_end|>")


def test_score_shapes_and_unknown_side(rm):
    assert rm.score(["a", "b"], ["x", "y"]).shape == (2, 2)
    assert rm.score(["a", "b"], ["x", "y"], side="P2B").shape == (2,)
    with pytest.raises(ModelError, match="scores sides P2A, P2B, not P1A"):
        rm.score(["a"], ["x"], side="P1A")


def test_save_load_roundtrip(rm, tmp_path, tiny_model_dir):
    torch.nn.init.normal_(rm.head.weight)
    for name, p in rm.backbone.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    before = rm.score(["Explain rain."], ["Water falls."])
    rm.save(tmp_path / "rm")
    from personalign.models import load_model

    base, tok = load_model(str(tiny_model_dir), device="cpu")
    again = RewardModel.load(tmp_path / "rm", base=base, tokenizer=tok)
    assert torch.allclose(before, again.score(["Explain rain."], ["Water falls."]), atol=1e-6)


def test_load_refuses_other_base(rm, tmp_path):
    from conftest import build_tiny_model

    rm.save(tmp_path / "rm")
    other = build_tiny_model(rm.tokenizer, layers=3)
    with pytest.raises(ModelError, match="num_hidden_layers=2"):
        RewardModel.load(tmp_path / "rm", base=other, tokenizer=rm.tokenizer)
    with pytest.raises(ModelError, match="not a reward model folder"):
        RewardModel.load(tmp_path, base=other, tokenizer=rm.tokenizer)


def test_checkpoint_roundtrip_restores_optimizer(tmp_path):
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "ck", {"p": p.detach()}, opt, {"step": 1})
    p2 = torch.nn.Parameter(torch.zeros(3))
    opt2 = torch.optim.AdamW([p2], lr=0.5)
    state, progress = load_checkpoint(tmp_path / "ck", opt2)
    assert progress == {"step": 1} and torch.equal(state["p"], p.detach())
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert torch.equal(s1["state"][0]["exp_avg"], s2["state"][0]["exp_avg"])
    assert s2["param_groups"][0]["lr"] == 0.1
    assert load_checkpoint(tmp_path / "none") is None


def _pairs(path, n=40):
    rng = random.Random(0)
    rows = []
    for i in range(n):
        short = " ".join(["rain"] * rng.randint(1, 3))
        long = " ".join(["water falls from the clouds"] * rng.randint(4, 6))
        rows.append({"prompt": f"Question {i}?", "chosen": short, "rejected": long, "side": "P2A"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_rm_learns_and_resumes(tmp_path, tiny_model_dir, monkeypatch):
    from personalign.recipes import train_rm

    pairs = _pairs(tmp_path / "pairs.jsonl")
    common = dict(pairs=str(pairs), model=str(tiny_model_dir), lr=5e-3, epochs=2, batch_size=4, progress=False,
                  device="cpu", checkpoint_every=3, autocast_bf16=False)
    full = train_rm.main(train_rm.TrainRMConfig(output_dir=str(tmp_path / "full"), **common))
    assert full["eval/accuracy"] >= 0.75
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in m for m in lines) and any("eval/accuracy/P2A" in m for m in lines)

    # Interrupt after step 5, then resume: the result equals the uninterrupted run.
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", flaky)
    with pytest.raises(KeyboardInterrupt):
        train_rm.main(train_rm.TrainRMConfig(output_dir=str(tmp_path / "resumed"), **common))
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert (tmp_path / "resumed" / "checkpoint").exists()
    resumed = train_rm.main(train_rm.TrainRMConfig(output_dir=str(tmp_path / "resumed"), **common))
    assert resumed["eval/accuracy"] == pytest.approx(full["eval/accuracy"])
    assert resumed["eval/loss"] == pytest.approx(full["eval/loss"], rel=1e-4)
    # the steps logged after the checkpoint were redone, not logged twice
    again = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in again] == [m["step"] for m in lines]


def test_train_rm_bad_input(tmp_path, tiny_model_dir):
    from personalign.recipes import train_rm

    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        train_rm.main(train_rm.TrainRMConfig(pairs=str(empty), output_dir=str(tmp_path / "o")))
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(DataError, match="lacks string field"):
        train_rm.main(train_rm.TrainRMConfig(pairs=str(bad), output_dir=str(tmp_path / "o")))
    pairs = _pairs(tmp_path / "p.jsonl", 4)
    with pytest.raises(DataError, match="no pairs for side"):
        train_rm.main(train_rm.TrainRMConfig(pairs=str(pairs), sides=("P1A",), output_dir=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="eval_fraction"):
        train_rm.main(train_rm.TrainRMConfig(pairs=str(pairs), eval_fraction=1.5, output_dir=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="readout_layer must be at least 1"):
        train_rm.main(train_rm.TrainRMConfig(pairs=str(pairs), readout_layer=0, output_dir=str(tmp_path / "o")))
    from personalign.reward_model import LoraSpec

    model = {"model": str(tiny_model_dir), "device": "cpu", "progress": False}  # these need the model's layers
    with pytest.raises(ConfigError, match="readout_layer must be between 1 and 2"):
        train_rm.main(train_rm.TrainRMConfig(pairs=str(pairs), readout_layer=5, output_dir=str(tmp_path / "r5"),
                                             **model))
    with pytest.raises(ConfigError, match="lora top_layers=9 but the model has only 2 layers"):
        train_rm.main(train_rm.TrainRMConfig(pairs=str(pairs), lora=LoraSpec(top_layers=9),
                                             output_dir=str(tmp_path / "t9"), **model))
    assert not (tmp_path / "o").exists()


def test_multihead_scores_every_side_in_one_pass(tiny):
    base, tok = tiny
    multi = RewardModel(base, tok, ["P2A", "P2B", "P3A"], side_prompts={"P2A": "Be brief."})
    assert not multi.side_prompt_in_input
    assert "Be brief." not in multi.format("Hi", "x", side="P2A")
    calls = {"n": 0}
    handle = multi.head.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        all_sides = multi.score(["a", "b", "c"], ["x", "y", "z"], batch_size=8)
    finally:
        handle.remove()
    assert calls["n"] == 1 and all_sides.shape == (3, 3)
    assert torch.allclose(multi.score(["a", "b", "c"], ["x", "y", "z"], side="P2B"), all_sides[:, 1])


def test_single_side_model_conditions_on_side_prompt(rm):
    assert rm.side_prompt_in_input
    both = rm.score(["Hi"], ["x"])
    assert torch.allclose(both[:, 0], rm.score(["Hi"], ["x"], side="P2A"))
    assert torch.allclose(both[:, 1], rm.score(["Hi"], ["x"], side="P2B"))


def test_lora_on_top_layers_only(tiny, tiny_model_dir, tmp_path):
    from personalign.models import load_model
    from personalign.reward_model import LoraSpec

    base, tok = tiny  # two decoder layers
    rm = RewardModel(base, tok, ["P2A"], LoraSpec(top_layers=1))
    adapted = {n.split(".lora_A")[0] for n, _ in rm.backbone.named_parameters() if ".lora_A" in n}
    assert adapted and all(".layers.1." in n for n in adapted)
    assert len(adapted) == len(LoraSpec().target_modules)  # every target module of the last layer
    for name, p in rm.backbone.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    before = rm.score(["Explain rain."], ["Water falls."])
    rm.save(tmp_path / "rm")
    base2, tok2 = load_model(str(tiny_model_dir), device="cpu")
    again = RewardModel.load(tmp_path / "rm", base=base2, tokenizer=tok2)
    assert torch.allclose(before, again.score(["Explain rain."], ["Water falls."]), atol=1e-6)
    with pytest.raises(ValueError, match="only 2 layers"):
        RewardModel(load_model(str(tiny_model_dir), device="cpu")[0], tok, ["P2A"], LoraSpec(top_layers=3))
    with pytest.raises(ValueError, match="at least 1"):
        LoraSpec(top_layers=0)


def _top_layer_rm(tiny):
    from personalign.reward_model import LoraSpec

    base, tok = tiny  # two decoder layers; LoRA on the second only
    rm = RewardModel(base, tok, ["P2A", "P2B"], LoraSpec(top_layers=1, dropout=0.0))
    for name, p in rm.backbone.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return rm


def test_prefix_cache_matches_full_forward_and_gradients(tiny):
    from personalign.reward_model import PrefixCache

    rm = _top_layer_rm(tiny)
    assert rm.frozen_prefix() == 1
    texts = [rm.format("Explain rain.", "Water falls from clouds."), rm.format("Hi", "Hello!"),
             rm.format("Explain rain.", "Water falls from clouds.")]  # a repeated text is computed once
    cache = PrefixCache.for_model(rm, texts)
    assert cache is not None and cache.layers == 1
    rm.train()
    full = rm(**rm.encode(texts))
    cached = cache.rewards(texts)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    assert len(cache.store) == 2 and cache.hits == 1
    # Gradients reach the adapted layer and the head exactly as through the full model.
    lora = [p for n, p in rm.named_parameters() if p.requires_grad]
    g_full = torch.autograd.grad(full.sum(), lora)
    g_cached = torch.autograd.grad(cache.rewards(texts).sum(), lora)
    for a, b in zip(g_full, g_cached):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert cache.hits == 4  # the second call read every text from the cache
    assert len(list(rm.backbone.get_base_model().layers)) == 2  # the decoder is whole again


def test_prefix_cache_off_when_every_layer_is_adapted(rm):
    from personalign.reward_model import PrefixCache

    assert rm.frozen_prefix() == 0 and PrefixCache.for_model(rm, ["x"]) is None


def test_prefix_cache_off_when_split_differs(tiny, monkeypatch):
    from personalign.reward_model import PrefixCache

    top = _top_layer_rm(tiny)
    probe = [top.format("Hi", "Hello")]
    assert PrefixCache.for_model(top, probe) is not None
    # An architecture that transforms inputs_embeds would make the split disagree: no cache then.
    real = RewardModel.forward_from
    monkeypatch.setattr(RewardModel, "forward_from", lambda self, h, m, n: real(self, h * 2.0, m, n))
    assert PrefixCache.for_model(top, probe) is None


def test_train_rm_prefix_cache_same_result(tmp_path, tiny_model_dir):
    from personalign.recipes import train_rm

    pairs = _pairs(tmp_path / "pairs.jsonl")
    common = dict(pairs=str(pairs), model=str(tiny_model_dir), lr=5e-3, epochs=2, batch_size=4, progress=False,
                  device="cpu", autocast_bf16=False,
                  lora=train_rm.LoraSpec(top_layers=1, dropout=0.0))
    cached = train_rm.main(train_rm.TrainRMConfig(output_dir=str(tmp_path / "c"), **common))
    plain = train_rm.main(train_rm.TrainRMConfig(output_dir=str(tmp_path / "p"), prefix_cache=False, **common))
    assert cached["prefix_cache/layers"] == 1 and "prefix_cache/layers" not in plain
    assert cached["eval/loss"] == pytest.approx(plain["eval/loss"], rel=1e-3)
    assert cached["eval/accuracy"] == pytest.approx(plain["eval/accuracy"])


def test_readout_layer_reads_an_inner_layer_and_round_trips(tmp_path, tiny_model_dir):
    from conftest import build_tiny_model

    from personalign.models import load_model
    from personalign.reward_model import LoraSpec, PrefixCache, last_token_index

    _, tok = load_model(str(tiny_model_dir), device="cpu")
    base = build_tiny_model(tok, layers=3)
    rm = RewardModel(base, tok, ["P2A"], LoraSpec(top_layers=1, dropout=0.0), readout_layer=2)
    adapted = {n for n, _ in rm.backbone.named_parameters() if ".lora_A" in n}
    assert adapted and all(".layers.1." in n for n in adapted)  # the last layer in use, not layer 2
    for name, p in rm.backbone.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    rm.eval()
    texts = [rm.format("Explain rain.", "Water falls from clouds."), rm.format("Hi", "Hello!")]
    enc = rm.encode(texts)
    got = rm(**enc)
    with torch.no_grad():  # by hand: the layer-2 input (= layer-1 output), the final norm, the head
        out = rm.backbone(**enc, output_hidden_states=True)
        h = rm.backbone.get_base_model().norm(out.hidden_states[2])
        idx = last_token_index(enc["attention_mask"])
        want = rm.head(h[torch.arange(2), idx])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert len(rm.backbone.get_base_model().layers) == 3  # the model itself is left whole
    cache = PrefixCache.for_model(rm, texts)  # layer 0 frozen: cached, and the split reads layer 2 too
    assert cache is not None and cache.layers == 1
    torch.testing.assert_close(cache.rewards(texts), got, rtol=1e-5, atol=1e-5)

    rm.save(tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / "reward_config.json").read_text())["readout_layer"] == 2
    again = RewardModel.load(tmp_path / "rm", base=build_tiny_model(tok, layers=3), tokenizer=tok)
    assert again.readout_layer == 2
    torch.testing.assert_close(again(**enc), got, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="readout_layer must be between 1 and 3"):
        RewardModel(build_tiny_model(tok, layers=3), tok, ["P2A"], readout_layer=4)
    with pytest.raises(ValueError, match="in use"):
        RewardModel(build_tiny_model(tok, layers=3), tok, ["P2A"], LoraSpec(top_layers=3), readout_layer=2)


def test_fit_bradley_terry_head_is_the_regularised_optimum():
    from personalign.losses import fit_bradley_terry_head

    g = torch.Generator().manual_seed(0)
    true = torch.tensor([2.0, -1.0, 0.0])
    x = torch.randn(400, 3, generator=g) * torch.tensor([1.0, 10.0, 0.1])  # features on different scales
    labels = (torch.rand(400, generator=g) < torch.sigmoid(x @ (true / torch.tensor([1.0, 10.0, 0.1])))).float()
    diff = x * (2 * labels - 1)[:, None]  # chosen - rejected: flip the pairs whose label is 0
    l2 = 1e-2
    w = fit_bradley_terry_head(diff, l2).double()
    # Optimality in the standardised space: grad of mean(-log sigmoid(xs @ v)) + l2 |v|^2 is zero.
    scale = diff.double().pow(2).mean(0).sqrt()
    v = (w * scale).requires_grad_(True)
    loss = -torch.nn.functional.logsigmoid((diff.double() / scale) @ v).mean() + l2 * (v * v).sum()
    (grad,) = torch.autograd.grad(loss, v)
    assert grad.abs().max() < 1e-4  # at the optimum up to the float32 result
    assert (diff.double() @ w > 0).double().mean() > 0.7  # it ranks most pairs the right way
    assert w[0] > 0 and w[1] < 0
    with pytest.raises(ValueError, match=r"\(N, H\)"):
        fit_bradley_terry_head(torch.zeros(0, 3))


def test_select_l2_by_cv_scores_unseen_instructions():
    from personalign.losses import fit_bradley_terry_head, select_l2_by_cv

    g = torch.Generator().manual_seed(1)
    # 2 informative features among 60 noise features and 120 pairs: a weak penalty overfits the noise.
    x = torch.randn(120, 62, generator=g)
    true = torch.zeros(62)
    true[:2] = torch.tensor([1.5, -1.0])
    labels = (torch.rand(120, generator=g) < torch.sigmoid(x @ true)).float()
    diff = x * (2 * labels - 1)[:, None]
    groups = [f"q{i // 3}" for i in range(120)]  # 40 instructions, 3 pairs each
    best, scores = select_l2_by_cv(diff, groups, [1e-4, 1.0], folds=5, seed=0)
    assert set(scores) == {1e-4, 1.0} and best == 1.0
    # By hand for one candidate: fold k holds the instructions dealt to it after the seeded shuffle.
    import random

    names = sorted(set(groups))
    random.Random(0).shuffle(names)
    fold = torch.tensor([{n: i % 5 for i, n in enumerate(names)}[q] for q in groups])
    accs = []
    for k in range(5):
        w = fit_bradley_terry_head(diff[fold != k], 1.0)
        accs.append(float((diff[fold == k] @ w > 0).float().mean()))
    assert scores[1.0] == pytest.approx(sum(accs) / 5)
    assert scores[1.0] > scores[1e-4]
    with pytest.raises(ValueError, match="cannot be split into 5 folds"):
        select_l2_by_cv(diff[:6], groups[:6], [1.0])
    with pytest.raises(ValueError, match="grid of l2 values is empty"):
        select_l2_by_cv(diff, groups, [])


def test_train_rm_probe_head_init(tmp_path, tiny_model_dir):
    from personalign.recipes import train_rm

    pairs = _pairs(tmp_path / "pairs.jsonl")
    common = dict(pairs=str(pairs), model=str(tiny_model_dir), lr=1e-3, epochs=1, batch_size=4, progress=False,
                  device="cpu", lora=train_rm.LoraSpec(top_layers=1, dropout=0.0))
    result = train_rm.main(train_rm.TrainRMConfig(output_dir=str(tmp_path / "p"), **common))
    rows = [json.loads(x) for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]
    assert first["step"] == 0 and "probe/train_accuracy/P2A" in first and "eval/accuracy" in first
    assert first["probe/train_accuracy/P2A"] >= 0.75  # the toy pairs are separable by length
    assert result["eval/accuracy"] >= 0.75
    plain = train_rm.main(train_rm.TrainRMConfig(output_dir=str(tmp_path / "r"), head_init="random", **common))
    assert "probe/train_accuracy/P2A" not in (tmp_path / "r" / "metrics.jsonl").read_text()
    assert plain["data/train_pairs"] == result["data/train_pairs"]
    with pytest.raises(ConfigError, match="head_init"):
        train_rm.main(train_rm.TrainRMConfig(output_dir=str(tmp_path / "x"), head_init="zeros", **common))
    # The probe's penalty chosen by cross-validation on the training pairs: logged with every candidate.
    train_rm.main(train_rm.TrainRMConfig(output_dir=str(tmp_path / "cv"), probe_l2_grid=(0.01, 100.0), **common))
    first = json.loads((tmp_path / "cv" / "metrics.jsonl").read_text().splitlines()[0])
    cv = {k: v for k, v in first.items() if k.startswith("probe/cv_accuracy/P2A/")}
    assert set(cv) == {"probe/cv_accuracy/P2A/l2=0.01", "probe/cv_accuracy/P2A/l2=100"}
    assert first["probe/l2/P2A"] in (0.01, 100.0)
    assert cv[f"probe/cv_accuracy/P2A/l2={first['probe/l2/P2A']:g}"] == max(cv.values())
    with pytest.raises(ConfigError, match="must be positive"):
        train_rm.TrainRMConfig(output_dir=str(tmp_path / "x"), probe_l2_grid=(0.0,), **common)


def test_pool_last_and_mean_by_hand():
    from personalign.reward_model import pool

    h = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool(h, mask, "last"), torch.stack([h[0, 1], h[1, 2]]))
    torch.testing.assert_close(pool(h, mask, "mean"), torch.stack([h[0, :2].mean(0), h[1].mean(0)]))
    both = pool(h, mask, "last+mean")
    assert both.shape == (2, 4)
    torch.testing.assert_close(both, torch.cat([pool(h, mask, "last"), pool(h, mask, "mean")], dim=-1))
    with pytest.raises(ValueError, match="pooling must be one of last, mean"):
        pool(h, mask, "max")


def test_mean_pooling_ignores_padding_caches_and_round_trips(tmp_path, tiny_model_dir):
    from conftest import build_tiny_model

    from personalign.models import load_model
    from personalign.reward_model import LoraSpec, PrefixCache

    _, tok = load_model(str(tiny_model_dir), device="cpu")
    rm = RewardModel(build_tiny_model(tok, layers=3), tok, ["P2B"], LoraSpec(top_layers=1, dropout=0.0),
                     readout_layer=2, pooling="mean")
    rm.eval()
    texts = [rm.format("Explain rain.", "Water falls from clouds when drops grow heavy."), rm.format("Hi", "Hello!")]
    enc = rm.encode(texts)
    got = rm(**enc)
    alone = rm(**rm.encode(texts[1:]))
    torch.testing.assert_close(got[1:], alone, rtol=1e-5, atol=1e-5)  # padding does not enter the mean
    with torch.no_grad():  # by hand: mean over real tokens of the normed layer-2 state
        out = rm.backbone(**enc, output_hidden_states=True)
        h = rm.backbone.get_base_model().norm(out.hidden_states[2])
        m = enc["attention_mask"].float()[..., None]
        want = rm.head((h * m).sum(1) / m.sum(1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    cache = PrefixCache.for_model(rm, texts)
    assert cache is not None
    torch.testing.assert_close(cache.rewards(texts), got, rtol=1e-5, atol=1e-5)
    rm.save(tmp_path / "rm")
    again = RewardModel.load(tmp_path / "rm", base=build_tiny_model(tok, layers=3), tokenizer=tok)
    assert again.pooling == "mean"
    torch.testing.assert_close(again(**enc), got, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pooling must be one of"):
        RewardModel(build_tiny_model(tok, layers=3), tok, ["P2B"], pooling="max")
    both = RewardModel(build_tiny_model(tok, layers=3), tok, ["P2A", "P2B"], readout_layer=2, pooling="last+mean")
    assert both.head.in_features == 2 * both.backbone.get_base_model().config.hidden_size
    assert both(**enc).shape == (2, 2)
    both.save(tmp_path / "both")
    assert RewardModel.load(tmp_path / "both", base=build_tiny_model(tok, layers=3), tokenizer=tok).pooling == "last+mean"


def test_train_rm_refuses_a_model_trained_on_other_pairs(tmp_path, tiny_model_dir):
    from personalign.recipes import train_rm

    pairs = _pairs(tmp_path / "pairs.jsonl", 12)
    cfg = train_rm.TrainRMConfig(pairs=str(pairs), output_dir=str(tmp_path / "rm"), model=str(tiny_model_dir),
                                 epochs=1, batch_size=4, progress=False, device="cpu")
    first = train_rm.main(cfg)
    data = json.loads((tmp_path / "rm" / "data.json").read_text())
    assert data["pairs"] == {"P2A": 12} and len(data["sha256"]) == 64
    lines = pairs.read_text().splitlines(keepends=True)
    pairs.write_text("".join(reversed(lines)))  # the same pairs in another order: the model still stands
    assert train_rm.main(cfg)["eval/accuracy"] == first["eval/accuracy"]
    extra = {"prompt": "Question 99?", "chosen": "rain", "rejected": "water falls", "side": "P2A"}
    pairs.write_text("".join(lines) + json.dumps(extra) + "\n")
    weights = (tmp_path / "rm" / "reward_model.safetensors").read_bytes()
    with pytest.raises(DataError, match=r"trained on other pairs \(\{'P2A': 12\}\).*\{'P2A': 13\}.*move the folder"):
        train_rm.main(cfg)
    assert (tmp_path / "rm" / "reward_model.safetensors").read_bytes() == weights  # nothing lost


def test_data_fingerprint_ignores_order_and_counts_sides():
    from personalign.recipes.train_rm import data_fingerprint

    a = {"prompt": "q", "chosen": "x", "rejected": "y", "side": "P1A"}
    b = {"prompt": "q", "chosen": "y", "rejected": "x", "side": "P3B"}
    assert data_fingerprint([a, b]) == data_fingerprint([b, a])
    assert data_fingerprint([a, b])["pairs"] == {"P1A": 1, "P3B": 1}
    assert data_fingerprint([a])["sha256"] != data_fingerprint([{**a, "chosen": "z"}])["sha256"]
