# The README's two commands are `make demo` and `make test`; everything else is here for developers.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export TCP_NODELAY := 1

.PHONY: bootstrap test demo cluster-demo serve viewer train-demo train-real bench

bootstrap:
	@scripts/bootstrap

test: bootstrap
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

demo: bootstrap
	$(PY) -m pacs_landmarks.demo

# The distributed mode on one machine (docs/scale-out.md): PostgreSQL, two Orthancs, two workers.
cluster-demo: bootstrap
	$(PY) -m pacs_landmarks.cluster_demo

serve: bootstrap
	$(PY) -m pacs_landmarks.plugin.serve

# OHIF (pinned, fetched with npm pack into var/ohif the first time) against `make serve`'s Orthanc.
viewer: bootstrap
	$(PY) -m pacs_landmarks.viewer $(VIEWER_ARGS)

train-demo: bootstrap
	scripts/train-demo

# The shipped model with real anatomy: phantoms + warps of the annotated real heads in REAL_HEADS (docs/training.md).
train-real: bootstrap
	REAL_HEADS=$(REAL_HEADS) scripts/train-real

bench: bootstrap
	for b in bench/*.py; do $(PY) $$b || exit 1; done
