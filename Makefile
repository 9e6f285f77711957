# One command for the documentation site: `make docs` (then open docs/_build/html/index.html).
# `make docs-check` also opens every page in headless Chromium (tests/test_docs_site.py; needs
# Debian's chromium and chromium-driver). The docs get their own venv (build/ is git-ignored).
PYTHON ?= python3
DOCS_VENV ?= build/docs-venv
SPHINXOPTS ?= -W --keep-going

.PHONY: docs docs-check docs-clean

$(DOCS_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DOCS_VENV)/bin/python -m pip install --quiet -e ".[docs]"
	touch $@

docs: $(DOCS_VENV)/.installed
	$(DOCS_VENV)/bin/sphinx-build $(SPHINXOPTS) -b html docs docs/_build/html
	@echo "open docs/_build/html/index.html"

docs-check: docs
	# --noconftest: tests/conftest.py only sets up hypothesis, which the docs venv does not have.
	REPNP_DOCS_CHECK=1 $(DOCS_VENV)/bin/python -m pytest -q -p no:cacheprovider --noconftest tests/test_docs_site.py

docs-clean:
	rm -rf docs/_build
