# The README's two commands are `make demo` and `make test`; everything else is here for developers.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export TCP_NODELAY := 1

.PHONY: bootstrap test demo demo-ceph cluster-demo serve viewer train-demo train-demo-ceph train-real bench

bootstrap:
	@scripts/bootstrap

test: bootstrap
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

demo: bootstrap
	$(PY) -m pacs_landmarks.demo

# Only the demo's cephalogram step: a synthetic lateral ceph through Orthanc + plugin, its tracing printed.
demo-ceph: bootstrap
	$(PY) -m pacs_landmarks.demo --ceph-only --out var/demo-ceph

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

# The cephalogram demo model from synthetic cephalograms (docs/training.md, Cephalograms).
train-demo-ceph: bootstrap
	scripts/train-demo-ceph

# The CT model with real anatomy: phantoms + warps of the annotated real heads in REAL_HEADS (docs/training.md).
train-real: bootstrap
	REAL_HEADS=$(REAL_HEADS) scripts/train-real

bench: bootstrap
	for b in bench/*.py; do $(PY) $$b || exit 1; done
