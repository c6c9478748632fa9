"""Shared fixtures: a tiny random llama with a tokenizer trained in-process (nothing downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never reach a hub from tests; a test that would download must fail fast instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Explain photosynthesis to me.", "How do I bake bread at home?", "Compare stocks and bonds.",
    "List five famous painters.", "What is the capital of France?", "Write a short poem about rain.",
    "Plants use sunlight, water and carbon dioxide to make sugar and oxygen.",
    "A budget helps you track income and spending each month.", "The heart pumps blood around the body.",
    "Python lists are mutable; tuples are not.", "The Roman Empire fell in 476 in the west.",
    "Stretch before you run, and drink water.", "system user assistant You are a helpful assistant.",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from personalign.preferences import BUILTIN_SIDES

    corpus = CORPUS + [s.prompt for s in BUILTIN_SIDES] + [s.criterion for s in BUILTIN_SIDES]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML
    return tok


def build_tiny_model(tok, seed: int = 0, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval()


def build_tiny_experts(tok, names, seed: int = 1):
    """A tiny llama with one LoRA adapter per name whose B matrices are random (peft starts them at zero)."""
    import torch
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    model = get_peft_model(build_tiny_model(tok, seed=0), cfg, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module_name, param in model.named_parameters():
            if "lora_B" in module_name:
                param.normal_(0, 0.5)
    return model.eval()


def save_side_experts(model_dir, folder, sides):
    """One saved adapter per side under ``folder/<SIDE>/adapter`` (random B), as `--experts` reads them."""
    import torch
    from peft import LoraConfig, get_peft_model

    from personalign.models import load_model

    for i, side in enumerate(sides):
        base, _ = load_model(str(model_dir), device="cpu", dtype="float32")
        # LoRA on the output layer too, so that the experts' next-token distributions clearly differ.
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"])
        peft_model = get_peft_model(base, lora)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.7)
        peft_model.save_pretrained(folder / side / "adapter", save_embedding_layers=False)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder holding a 2-layer random llama and its tokenizer, loadable by load_model(path)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny(tiny_model_dir):
    """(model, tokenizer) loaded through personalign's loader."""
    from personalign.models import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch, request):
    """Unit tests never touch the user's cache; integration tests share the real one."""
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setenv("PERSONALIGN_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def ship_script(tmp_path, monkeypatch):
    """Load ``scripts/<name>`` with its ROOT at ``tmp_path/repo`` (holding an empty weights distribution
    for the embedded default, ``weights/smollm2-135m-instruct/src/personalign_smollm2/``); returns
    run(name, *args) -> exit code."""
    import importlib.util
    import sys

    package = tmp_path / "repo" / "weights" / "smollm2-135m-instruct" / "src" / "personalign_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")

    def run(name: str, *args: str) -> int:
        script = Path(__file__).resolve().parents[1] / "scripts" / name
        spec = importlib.util.spec_from_file_location(script.stem, script)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        monkeypatch.setattr(mod, "ROOT", tmp_path / "repo")
        monkeypatch.setattr(sys, "argv", [name, *args])
        return mod.main()

    return run


@pytest.fixture
def shipped_weights(monkeypatch):
    """Replace the installed ``personalign.weights`` entry points: call it with {model: {"experts": folder,
    "pcm": folder}} (a value may also be an exception to raise, as a broken distribution would)."""
    import personalign.weights as weights

    class EntryPoint:
        def __init__(self, name, folders):
            self.name, self.value, self.dist, self._folders = name, f"fake:{name}", None, folders

        def load(self):
            def folders():
                if isinstance(self._folders, Exception):
                    raise self._folders
                return self._folders

            return folders

    def install(table):
        eps = [EntryPoint(name, folders) for name, folders in table.items()]
        monkeypatch.setattr(weights, "entry_points", lambda group: [e for e in eps if group == weights.GROUP])

    return install


def record_rl_scores(module, monkeypatch, coverage: list[float], repetition: list[float] | None = None) -> list:
    """Patch an RL recipe ``module`` so each sample's question coverage is ``coverage`` (and its share of
    repeated 3-grams ``repetition``, when given) and every call of its ``rl_update`` records the normalised
    scores it is given; returns that record (a list of tensors)."""
    monkeypatch.setattr(module, "question_coverage", lambda prompts, texts: coverage[: len(texts)])
    if repetition is not None:
        monkeypatch.setattr(module, "repeated_trigram_shares", lambda texts: repetition[: len(texts)])
    seen = []
    real = module.rl_update

    def spy(rl_state, ro, score_n, *a, **k):
        seen.append(score_n.detach().clone())
        return real(rl_state, ro, score_n, *a, **k)

    monkeypatch.setattr(module, "rl_update", spy)
    return seen
