# Newcomer entry points: `make serve` and `make test` (both set up .venv first).
VENV := .venv
STAMP := $(VENV)/.setup-stamp

.PHONY: setup serve test
setup: $(STAMP)

$(STAMP): deploy/setup.sh pyproject.toml
	bash deploy/setup.sh
	touch $@

serve: $(STAMP)
	$(VENV)/bin/tucker-serve serve $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(ARGS)
