# Set-up, demo, tests and benchmarks. Every target installs what it needs into .venv/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
IMAGE ?= fedjax-core:0.1.0
PROTOS := $(wildcard protos/fedjax_proto/*.proto)

.PHONY: install demo test test-slow bench bench-peers bench-scale bench-scale-1000 bench-grpc-floor bench-simulation bench-privacy bench-strategies bench-research bench-tensors fuzz proto lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: install
	$(PY) -u scripts/demo.py

test: install
	$(PY) -m pytest -q -ra

test-slow: install
	$(PY) -m pytest -q -ra -m slow

bench: install
	$(PY) -u benchmarks/bench.py
	$(PY) -u benchmarks/secagg.py

bench-peers: install  # this project and Flower side by side (Flower in its own .venv-flower/)
	$(PY) -u benchmarks/peers.py

bench-scale: install  # 256 simulated envoys on one director: rounds, heartbeats, director CPU and memory per envoy
	$(PY) -u benchmarks/scale.py $(SCALE_ARGS)

bench-scale-1000: install  # the same with 1,000 envoys (make bench-scale SCALE_ARGS="--envoys N ..." for others)
	$(PY) -u benchmarks/scale.py --envoys 1000 --out bench-results/scale-1000.json $(SCALE_ARGS)

bench-grpc-floor: install  # what one gRPC round trip costs a bare server here: the floor under bench-scale's CPU per envoy-round
	$(PY) -u benchmarks/grpc_floor.py $(FLOOR_ARGS)

bench-simulation: install  # 1,000 simulated envoys: this project (sequential, vectorised), Flower's engine, the floor
	$(PY) -u benchmarks/simulation.py

bench-privacy: install  # accuracy against epsilon: no DP, CentralDP at three noise multipliers, LocalDP at two epsilons
	$(PY) -u benchmarks/privacy_accuracy.py --json bench-results/privacy_accuracy.json

bench-strategies: install
	$(PY) -u benchmarks/strategies.py

bench-research: install
	$(PY) -u benchmarks/research.py

bench-tensors: install  # a model of 20,000 tiny tensors: submission, rounds and heartbeats meanwhile
	$(PY) -u benchmarks/many_tensors.py --tensors 1000 20000 --rounds 2 --json bench-results/many_tensors.json

fuzz: install
	$(PY) -u benchmarks/fuzz_rpcs.py --messages 10000 --passes 2

proto: install
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)

.PHONY: image
image:  # the container image compose.yaml runs (docs/deploy.md)
	docker build -t $(IMAGE) .

lint: install
	$(PY) -m pyflakes $$(git ls-files '*.py' | grep -v '_pb2')

clean:
	rm -rf $(VENV) .venv-flower build *.egg-info
