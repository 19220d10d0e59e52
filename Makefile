# Two commands: `make lab` to learn, `make test` to check everything.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
# Every notebook's kernelspec names this kernel (scripts/execute_notebooks.py keeps it so); it is
# registered inside .venv, so it always runs the course's Python. Tests never need it: nbval runs
# the current environment (--nbval-current-env) and the browser test registers its own copy.
KERNEL := distributed-inference
KERNEL_DISPLAY := Python (distributed inference course)
# JupyterLab's defaults for the course (lab-settings/README.md) and the page the printed URL opens.
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings
FIRST_PAGE := /lab/tree/notebooks/00_welcome.ipynb
COURSE_NOTEBOOKS = $(wildcard notebooks/[0-9][0-9]_*.ipynb solutions/[0-9][0-9]_*.ipynb exercises/[0-9][0-9]_*.ipynb)
PYTEST_NB := --nbval --nbval-current-env --nbval-cell-timeout=600 \
             --nbval-sanitize-with tests/nbval_sanitize.cfg

.PHONY: lab lab-setup test test-handouts test-browser test-portable venv browser notebooks exercises grade nbgrader-source benchmarks clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[lab,dev,instructor]"
	touch $(STAMP)

venv: $(STAMP)

# Everything `make lab` sets up before it starts JupyterLab; running it twice changes nothing.
lab-setup: $(STAMP)
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name $(KERNEL) \
	    --display-name "$(KERNEL_DISPLAY)" >/dev/null
	mkdir -p $(LAB_SETTINGS)
	cp lab-settings/overrides.json $(LAB_SETTINGS)/overrides.json
	$(BIN)/jupyter trust $(COURSE_NOTEBOOKS) >/dev/null

lab: lab-setup
	@echo "Starting JupyterLab on $(CURDIR); open the URL it prints (http://127.0.0.1:...)."
	$(BIN)/jupyter lab --no-browser --ServerApp.ip=127.0.0.1 \
	    --ServerApp.root_dir=$(CURDIR) --LabApp.default_url=$(FIRST_PAGE) $(ROOT_FLAG)

# The browser test drives Debian's chromium (never a browser downloaded by playwright) and shows the
# lessons' Chinese text in a CJK font; as root we install both, otherwise that one test skips and says why.
browser:
	@missing=""; command -v chromium >/dev/null || missing="chromium"; \
	dpkg -s fonts-noto-cjk >/dev/null 2>&1 || missing="$$missing fonts-noto-cjk"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; fi; \
	command -v chromium >/dev/null || echo "chromium is not installed: tests/test_browser.py will skip"

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "not handouts" tests notebooks $(PYTEST_NB)

# The handouts run top to bottom: every solutions/ notebook (its checks pass on real ranks) and every
# exercises/ notebook (its stubs say "not attempted"); then a fake class is graded end to end, by
# `python -m lessons_lib.grade` and by nbgrader, and the solutions on ranks pass the hidden cases.
# `make test` judges the same answers and stubs through tests/test_exercises_NN.py; .ci/run runs
# this after it.
test-handouts: $(STAMP)
	$(BIN)/python -m pytest -q solutions exercises $(PYTEST_NB)
	$(BIN)/python -m pytest -q -m handouts tests

# Every step of the browser test on every lesson with a widget (make test opens them all and runs one).
test-browser: $(STAMP) browser
	BROWSER_RUN=all $(BIN)/python -m pytest -q tests/test_browser.py

# The lesson notebooks again on torch's portable kernels (no AVX) and one thread: a printed number
# that depends on the CPU's kernels or the thread count fails here (.ci/run runs it after `make test`).
test-portable: $(STAMP)
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q notebooks $(PYTEST_NB)

# Regenerate exercises/ from solutions/: unchanged notebooks are left alone, a notebook whose
# code changed is re-executed in place (outputs kept, nothing left dirty).
exercises: $(STAMP)
	$(BIN)/python -m lessons_lib.exercises.stubs

# `make notebooks` regenerates the exercises, then re-executes every notebook in place.
notebooks: $(STAMP)
	$(BIN)/python -m lessons_lib.exercises.stubs --no-execute
	$(BIN)/python scripts/execute_notebooks.py

# Grade a class: SUBMISSIONS holds one folder per student with their NN_topic.ipynb files;
# writes grades.csv and grades.md next to it (in grades/). See README, "For instructors".
grade: $(STAMP)
	@test -n "$(SUBMISSIONS)" || { echo "usage: make grade SUBMISSIONS=path/to/submissions"; exit 2; }
	$(BIN)/python -m lessons_lib.grade "$(SUBMISSIONS)"

# nbgrader: an assignment's source notebooks from solutions/, e.g.
# make nbgrader-source COURSE=~/course ASSIGNMENT=lab1 LESSONS="03 10"; then nbgrader in COURSE.
nbgrader-source: $(STAMP)
	@test -n "$(COURSE)" -a -n "$(ASSIGNMENT)" || { echo "usage: make nbgrader-source COURSE=dir ASSIGNMENT=name [LESSONS=\"03 10\"]"; exit 2; }
	$(BIN)/python -m lessons_lib.grade.nbgrader "$(COURSE)" "$(ASSIGNMENT)" $(LESSONS)

benchmarks: $(STAMP)
	for b in benchmarks/[!_]*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
