# The two commands a newcomer needs are `make run` and `make test`; both set up .venv first.
PY        ?= python3
VENV      := .venv
VPY       := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
NATIVE    := $(wildcard native/src/*.c native/include/shmb/*.h)
DATA_DIR  ?= $(or $(SHMBROKER_DATA_DIR),$(HOME)/.local/share/shmbroker)

.PHONY: run test bench native clean pyc

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install --upgrade --quiet pip

# Re-install (and so rebuild the C extension) whenever the native sources or the build
# description change. Editable install: Python edits take effect without a rebuild.
$(STAMP): $(VPY) pyproject.toml setup.py $(NATIVE)
	$(VPY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

native: $(STAMP)

# Bytecode written ahead: with PYTHONDONTWRITEBYTECODE set (as in CI's containers) every
# broker process and client a test starts compiled the package from source again, ~0.4 s of
# each broker start (perf/RESULTS.md, nineteenth session). Only changed files are redone.
pyc: $(STAMP)
	$(VPY) -m compileall -q shmbroker

run: $(STAMP) pyc
	$(VENV)/bin/shmbroker demo --data-dir "$(DATA_DIR)"

test: $(STAMP) pyc
	$(VPY) -m pytest -n auto -q

# The bench extra (peers of perf/bench_ipc.py) is installed on first use. Redis rows also
# need redis-server (apt-get install redis-server); without it they are skipped with a note.
bench: $(STAMP)
	$(VPY) -c 'import faster_fifo, iceoryx2, redis, hiredis' 2>/dev/null || \
		$(VPY) -m pip install --quiet -e '.[dev,bench]'
	$(VPY) perf/bench_log.py
	$(VPY) perf/bench_ipc.py
	$(VPY) perf/bench_groups.py
	$(VPY) perf/bench_remote.py

clean:
	rm -rf build *.egg-info shmbroker/*.so
	find shmbroker -name __pycache__ -prune -exec rm -rf {} +
