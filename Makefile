# Two commands on a fresh machine:
#   make demo   set up, get Fashion-MNIST, run the group-count study (G = 1..4, 2 epochs, seed 0)
#   make test   set up if needed, run the tests
# and the README's results:
#   make study        G = 1, 2 x 14 seeds and G = 3, 4 x 7 seeds, 4 epochs, two runs at a time, after timing each G's step -> docs/study/
#   make topologies   6 configs x 3 seeds x 4 epochs (reuses make study's runs where it can) -> docs/topologies/
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The torch build to install first (this project is tested with these versions).
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test setup check-tools fashion-mnist clean study topologies

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c "import venv, ensurepip" 2>/dev/null || { echo "error: $(PYTHON) cannot make a virtualenv; install python3-venv (Debian/Ubuntu: apt-get install python3-venv)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# Debian/Ubuntu ship Fashion-MNIST as a package; elsewhere train.py downloads it with torchvision.
fashion-mnist:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -q && apt-get install -y -q dataset-fashion-mnist) || echo "apt failed; torchvision will download it"; \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
	  (sudo apt-get update -q && sudo apt-get install -y -q dataset-fashion-mnist) || echo "apt failed; torchvision will download it"; \
	else echo "no apt: train.py will download Fashion-MNIST with torchvision"; fi

demo: setup fashion-mnist
	$(BIN)/python scripts/compare_groups.py configs/fashion_mnist --seeds 0 --set train.epochs=2 --speed --runs-dir runs/demo
	@echo "This was one seed of 2 epochs: it cannot tell G = 2 from G = 1. make study can (58 minutes on 2 cores:"
	@echo "G = 1, 2 x 14 seeds, G = 3, 4 x 7, 4 epochs): it found G = 2 +0.21 points of error [+0.01, +0.42] at"
	@echo "1.15x the images/s of G = 1, and G = 3, 4 about +0.5 [intervals above 0]; its report is the README's table."

# the design is sized in docs/study.md: 14 paired seeds give G = 2 - G = 1 a 95% half-width of about 0.24 points
STUDY_DESIGN := g1=14 g2=14 g3=7 g4=7
study: setup fashion-mnist
	$(BIN)/python scripts/compare_groups.py configs/fashion_mnist --design $(STUDY_DESIGN) --speed --jobs 2 --runs-dir runs/study
	mkdir -p docs/study && cp runs/study/comparison.md runs/study/comparison.csv runs/study/comparison.png runs/study/speed.json docs/study/

# G = 1, 2, 4 of seeds 0-2 are make study's runs (same config and seed): linked, not trained again
TOPOLOGY_SHARED := g1-s0 g1-s1 g1-s2 g2-s0 g2-s1 g2-s2 g4-s0 g4-s1 g4-s2
topologies: setup fashion-mnist
	mkdir -p runs/topologies
	for r in $(TOPOLOGY_SHARED); do if [ -f runs/study/$$r/summary.json ] && [ ! -e runs/topologies/$$r ]; then ln -s ../study/$$r runs/topologies/$$r; fi; done
	$(BIN)/python scripts/compare_groups.py configs/fashion_mnist --configs g1 g2 g4 g4_own g4_shuffle root --seeds 0 1 2 --runs-dir runs/topologies
	mkdir -p docs/topologies && cp runs/topologies/comparison.md runs/topologies/comparison.csv runs/topologies/comparison.png docs/topologies/

# what the tests need beyond Python: a C compiler (torch.compile's CPU backend) and pgrep (procps)
check-tools:
	@command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || { echo "error: no C compiler (the torch.compile tests need one); install gcc (Debian/Ubuntu: apt-get install gcc)"; exit 2; }
	@command -v pgrep >/dev/null 2>&1 || { echo "error: no pgrep (a fault test needs it); install procps (Debian/Ubuntu: apt-get install procps)"; exit 2; }

test: setup check-tools
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs
