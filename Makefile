# make test — install what is missing, build the extension, run the whole suite (Triton under its CPU interpreter)
# make lint, make test-tools — ruff over the tree; the tests of tools/ (CI runs both too)
# make demo — the main job: train the digits MLP with SVP (fused kernels) and with backprop, side by side
#             make demo DATA_DIR=/path/to/mnist adds the MNIST recipe (one seed per method; MNIST_EPOCHS=N shortens it)
PYTHON ?= python3
PYTEST_ARGS ?=
DATA_DIR ?=
MNIST_EPOCHS ?=

.PHONY: deps build test test-tools lint demo bench check-cuda

deps:
	$(PYTHON) tools/install_deps.py

build: deps
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .

test: build
	TRITON_INTERPRET=1 $(PYTHON) -m pytest tests $(PYTEST_ARGS)

# the development tools' own tests (tools/tests), apart from the product's suite
test-tools: build
	$(PYTHON) -m pytest tools/tests $(PYTEST_ARGS)

# ruff with the rules of pyproject.toml over the whole tree
lint: deps
	$(PYTHON) -m ruff check .

demo: build
	$(PYTHON) -m svp_kernels.train.demo $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(if $(MNIST_EPOCHS),--mnist-epochs $(MNIST_EPOCHS))

bench: build
	$(PYTHON) bench/local_loss.py

check-cuda:
	bash tools/check_cuda.sh
