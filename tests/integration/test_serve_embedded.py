"""The server on the real embedded model, through the official openai client: soups and mixtures per
request give the text the command line gives, and preferences visibly change the answer."""

from __future__ import annotations

import pytest

from personalign.generation import SamplingConfig
from personalign.models import EMBEDDED_DEFAULT, load_model

pytestmark = pytest.mark.integration
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

QUESTION = "Why do leaves change colour in autumn?"


@pytest.fixture(scope="module")
def client():
    from personalign.serve import create_app, running_server

    model, tok = load_model(EMBEDDED_DEFAULT, device="cpu", dtype="float32")
    with running_server(create_app(model, tok, EMBEDDED_DEFAULT)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=600)


def ask(client, **extra) -> str:
    r = client.chat.completions.create(model=EMBEDDED_DEFAULT, messages=[{"role": "user", "content": QUESTION}],
                                       max_tokens=40, temperature=0.7, top_p=0.9, seed=5, extra_body=extra)
    return r.choices[0].message.content


@pytest.mark.parametrize("extra", [
    {"method": "soup", "merge": "exact"},
    {"method": "mope", "pcm": "shipped"},
    {"method": "mope", "mix": "uniform"},
])
def test_a_seeded_request_equals_the_generate_command(client, extra):
    from personalign.recipes import generate

    served = ask(client, preferences="1A,2A,3A", **extra)
    options = {k: v for k, v in extra.items() if k != "method"}
    rows = generate.main(generate.GenerateConfig(
        prefs="1A,2A,3A", method=extra["method"], instructions=(QUESTION,), batch_size=1, progress=False,
        sampling=SamplingConfig(max_new_tokens=40, temperature=0.7, top_p=0.9, seed=5), **options))
    assert served == rows[0]["response"]
    assert served != ask(client, preferences="1A,2A,3A", method="prompt")


def test_opposite_preferences_give_different_answers_through_a_soup(client):
    concise = ask(client, preferences="1A,2A,3A", method="soup")
    informative = ask(client, preferences="1B,2B,3B", method="soup")
    assert concise != informative


BEHAVIOUR = [
    "Why do leaves change colour in autumn?",
    "How does a refrigerator keep food cold?",
    "What causes the seasons on Earth?",
    "How do vaccines work?",
    "Why is the sky blue?",
    "How does a bicycle stay upright?",
]


@pytest.mark.parametrize("extra", [{"method": "prompt"}, {"method": "soup", "merge": "exact"},
                                   {"method": "mope", "pcm": "none"}])
def test_concise_answers_are_shorter_than_informative_ones_through_the_server(client, extra):
    """All 12 requests at once (they decode in one shared batch); a method that ignored the
    informativeness side would give answers of about the same length."""
    from concurrent.futures import ThreadPoolExecutor

    def words(prefs: str, question: str) -> int:
        r = client.chat.completions.create(model=EMBEDDED_DEFAULT, messages=[{"role": "user", "content": question}],
                                           max_tokens=160, temperature=0, extra_body={"preferences": prefs, **extra})
        return len(r.choices[0].message.content.split())

    jobs = [(p, q) for p in ("1A,2A,3A", "1A,2B,3A") for q in BEHAVIOUR]
    with ThreadPoolExecutor(len(jobs)) as pool:
        counts = list(pool.map(lambda j: words(*j), jobs))
    concise, informative = counts[: len(BEHAVIOUR)], counts[len(BEHAVIOUR):]
    assert sum(concise) < 0.8 * sum(informative), (concise, informative)
    assert sum(c < i for c, i in zip(concise, informative)) >= 4, (concise, informative)
