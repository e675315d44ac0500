#!/usr/bin/env bash
# The GPU figures in one go, for a lent H100/H200 with a fresh copy of the repo, in at most 8 minutes
# including the install. stdout: one JSON line per figure, each with "figure"; logs go to stderr.
#
#   1. train_speed_124M           tokenmill vs HF Llama and litgpt, compiled, bf16, 16 x 1024
#      train_speed_124M_doc_mask  tokenmill with document masking (train.doc_mask, FlexAttention), same shape
#   2. train_speed_350M_ac        350M with activation checkpointing none / selective / full, no peers
#      train_speed_mlm           the encoder (MaskedLM) at the 124M shape vs HF ModernBertForMaskedLM, rounds
#   3. memory                     one line per optimizer (adamw, muon, galore, galore_per_layer, sltrain) at 350M,
#                                 4 x 1024, bf16 autocast, 3 steps: CUDA peak, measured and predicted bytes
#   4. pytest_gpu                 the summary line of `python -m pytest -q -m gpu`
#   last: suite                   seconds and status of every step
#
#   bash benchmarks/gpu_suite.sh               # GPU: installs CUDA torch / test deps / litgpt if missing
#   bash benchmarks/gpu_suite.sh --no-install  # GPU, environment as it is
#   bash benchmarks/gpu_suite.sh --smoke       # CPU, tiny shapes, no install, well under a minute
#
# A step that fails or runs out of time still lets the others run: its line carries "error". Each step's
# timeout is its cap, cut so that the later steps keep a minimum and the whole stays within the budget
# (GPU_SUITE_BUDGET_S, default 470 s). Exit status 1 when any step reported an error.

set -uo pipefail  # no -e: one failing step must not end the suite

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
SMOKE=0
INSTALL=1
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1; INSTALL=0 ;;
    --no-install) INSTALL=0 ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_suite: unknown argument $arg (--smoke, --no-install)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if (( SMOKE )); then BUDGET=${GPU_SUITE_BUDGET_S:-110}; else BUDGET=${GPU_SUITE_BUDGET_S:-470}; fi
# Tiny smoke shapes: more intra-op threads only add contention on a busy CI machine (as tests/conftest.py).
(( SMOKE )) && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DEADLINE=$(( SECONDS + BUDGET ))
# This tree's code even where the editable install is missing or points at another copy.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
FAILED=0
SUMMARY=()

log() { echo "[gpu_suite +${SECONDS}s] $*" >&2; }

cuda_ok() { "$PY" -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; }

# ---- install (GPU only): each part only when missing, all inside the budget -------------------------
install() {
  local left
  if ! cuda_ok; then
    left=$(( DEADLINE - SECONDS - 240 ))  # leave the benchmarks at least four minutes
    (( left < 60 )) && left=60
    log "no CUDA torch: pip install torch===$TORCH_VERSION (up to ${left}s)"
    # '===' is the exact public version: a local '+cpu' build (installed, or on a local index) sorts above
    # the plain one and would satisfy '=='. On Linux x86_64 PyPI's plain build is the CUDA one.
    timeout -k 10 "$left" "$PY" -m pip install -q "torch===$TORCH_VERSION" >&2 || log "torch install failed"
    cuda_ok || log "still no CUDA device visible to torch: the GPU steps will report errors"
  fi
  # The test extra (pytest, hypothesis, and what the other test modules import) unless all installed.
  if ! "$PY" - >/dev/null 2>&1 <<'PY'
import importlib.metadata as md, re, tomllib
md.version("tokenmill")  # pyproject's list, not the installed metadata, which may predate it
for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]:
    md.version(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0])
PY
  then
    left=$(( DEADLINE - SECONDS - 200 ))
    (( left < 30 )) && left=30
    log "pip install -e .[test] (up to ${left}s)"
    timeout -k 10 "$left" "$PY" -m pip install -q -e ".[test]" >&2 || log "test extra install failed"
  fi
  if ! "$PY" -c "import litgpt" >/dev/null 2>&1; then  # optional peer: train_speed notes it when absent
    log "pip install litgpt (optional, up to 60s)"
    hub=$("$PY" -c "import huggingface_hub as h; print(h.__version__)" 2>/dev/null)
    timeout -k 10 60 "$PY" -m pip install -q litgpt >&2 || log "litgpt not installed; train_speed will skip it"
    # litgpt 0.5 pins huggingface-hub<1.4, which breaks transformers 5: put the hub back (litgpt's model
    # code does not use it)
    [[ -n "$hub" ]] && timeout -k 10 60 "$PY" -m pip install -q "huggingface-hub==$hub" >&2
  fi
  cuda_ok || log "warning: torch no longer sees CUDA after the installs"
}

# ---- one JSON line (or several) per step --------------------------------------------------------------
cat > "$WORK/emit.py" <<'PY'
"""Turn a step's stdout into JSON lines tagged with its figure; a failure becomes an "error" line."""
import json, re, sys

figure, mode, rc, seconds, limit, out, err = sys.argv[1:8]
rc, seconds = int(rc), int(seconds)
text = open(out, errors="replace").read()
tail = open(err, errors="replace").read().strip().splitlines()[-15:]
lines, error = [], None
if mode == "pytest":
    summary = [l.strip("= ") for l in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|errors?)\b|no tests ran", l)]
    line = {"pytest_gpu": summary[-1] if summary else f"no summary line (exit {rc})", "rc": rc}
    if rc not in (0, 5):  # 5: nothing collected, not a failure of the suite; the error goes on the same line
        line["error"] = f"timed out after {limit}s" if rc in (124, 137) else f"pytest exit {rc}"
        line["failures"] = [l for l in text.splitlines() if l.startswith(("FAILED", "ERROR"))][:20]
    lines.append(line)
else:
    for l in text.splitlines():
        try:
            obj = json.loads(l)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            lines.append(obj)
        elif l.strip():
            print(f"[{figure} stdout] {l}", file=sys.stderr)  # keep stdout JSON only
    if rc in (124, 137):
        error = f"timed out after {limit}s"
    elif rc:
        error = f"exit {rc}: " + (tail[-1] if tail else "")
    elif not lines:
        error = "no JSON line on stdout"
for obj in lines:
    print(json.dumps({"figure": figure, **obj, "step_seconds": seconds}))
if error:
    print(json.dumps({"figure": figure, "error": error, "rc": rc, "step_seconds": seconds, "stderr_tail": tail}))
sys.exit(1 if error or any("error" in o for o in lines) else 0)
PY

# run_step FIGURE MODE CAP RESERVE -- COMMAND...: COMMAND under a timeout of CAP seconds, or less where the
# budget minus RESERVE (the minimum kept for the steps after this one) is shorter.
run_step() {
  local figure=$1 mode=$2 cap=$3 reserve=$4; shift 5
  local limit=$(( DEADLINE - SECONDS - reserve ))
  (( limit > cap )) && limit=$cap
  if (( limit < 10 )); then
    log "$figure: skipped, no time left"
    printf '{"figure": "%s", "error": "no time left in the %ss budget"}\n' "$figure" "$BUDGET"
    FAILED=1; SUMMARY+=("$figure=no_time"); return
  fi
  log "$figure: $* (timeout ${limit}s)"
  local start=$SECONDS rc
  timeout -k 10 "$limit" "$@" >"$WORK/out" 2>"$WORK/err"
  rc=$?
  tail -n 40 "$WORK/err" | sed "s/^/[$figure] /" >&2
  if "$PY" "$WORK/emit.py" "$figure" "$mode" "$rc" $(( SECONDS - start )) "$limit" "$WORK/out" "$WORK/err"; then
    SUMMARY+=("$figure=ok:$(( SECONDS - start ))s")
  else
    FAILED=1; SUMMARY+=("$figure=error:$(( SECONDS - start ))s")
  fi
}

# ---- (3) the memory snippet: one process, one line per optimizer as it finishes -----------------------
cat > "$WORK/memory_bench.py" <<'PY'
"""Peak memory of each train.optimizer: the model built as the training loop builds it (SLTrain applied
before parallelize, the optimizer from build_optimizer), 3 steps of autocast forward, backward, clip, step;
tensor bytes measured after step 1 as the loop does, beside memory.predict from the configs alone."""
import gc, json, sys, time
import torch
from tokenmill.model.llama import Llama, ModelConfig
from tokenmill.train.config import TrainConfig
from tokenmill.train.memory import measure, peak_bytes, predict
from tokenmill.train.optim import build_optimizer
from tokenmill.train.parallelize import parallelize
from tokenmill.train.sltrain import apply_sltrain

smoke = "--smoke" in sys.argv
if smoke:  # CPU, fp32, the tiny preset; SLTrain's default rank 128 exceeds its 32-row matrices
    device, bf16, micro, seq = torch.device("cpu"), False, 2, 64
    model_cfg = ModelConfig(preset="tiny", vocab_size=512)
    optimizers = [{"name": "adamw"}, {"name": "muon"}, {"name": "galore", "rank": 16},
                  {"name": "galore", "rank": 16, "per_layer_update": True}, {"name": "sltrain", "rank": 16}]
else:
    if not torch.cuda.is_available():
        sys.exit("memory: needs a CUDA device (or --smoke to check it runs on CPU)")
    device, bf16, micro, seq = torch.device("cuda"), True, 4, 1024
    model_cfg = ModelConfig(preset="350M", vocab_size=50304)
    optimizers = [{"name": "adamw"}, {"name": "muon"}, {"name": "galore"}, {"name": "galore", "per_layer_update": True},
                  {"name": "sltrain"}]
    torch.set_float32_matmul_precision("high")
for opt in optimizers:
    started = time.perf_counter()
    per_layer = opt.get("per_layer_update", False)  # steps inside backward: no global clipping
    line = {"optimizer": opt["name"] + ("_per_layer" if per_layer else ""), "settings": opt, "preset": model_cfg.preset, "micro_batch": micro,
            "seq_len": seq, "dtype": "bfloat16" if bf16 else "float32", "device": str(device)}
    try:
        cfg = TrainConfig(seq_len=seq, micro_batch_size=micro, global_batch_tokens=micro * seq, optimizer=opt,
                          device=device.type, dtype="bfloat16" if bf16 else "float32",
                          grad_clip=0.0 if per_layer else 1.0)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        else:  # "5" resets this process's VmHWM (Linux), so each optimizer gets its own peak RSS
            try:
                open("/proc/self/clear_refs", "w").write("5")
            except OSError:
                line["note"] = "peak RSS not reset: includes the optimizers before this one"
        torch.manual_seed(cfg.seed)
        model = Llama(model_cfg)
        if opt["name"] == "sltrain":
            apply_sltrain(model, cfg.optimizer, model_cfg, cfg.seed)
        model = parallelize(model.to(device).train(), cfg, None, bf16=bf16)
        optimizer = build_optimizer(model, cfg, device)
        measured = None
        for step in range(3):
            x = torch.randint(0, model_cfg.vocab_size, (micro, seq), device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                _, loss = model(x, torch.roll(x, -1, dims=1))
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if measured is None:  # every gradient and state tensor exists now, as in the loop
                measured = measure(model, optimizer)
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        peak, kind = peak_bytes(device)
        predicted = predict(model_cfg, cfg)
        line.update(peak_bytes=peak, peak_kind=kind, peak_gib=round(peak / 2**30, 3), measured=measured,
                    predicted=predicted, predicted_total_gib=round(predicted["total_bytes"] / 2**30, 3),
                    loss=round(loss.item(), 4))
        del model, optimizer, loss
    except Exception as err:  # noqa: BLE001 - report it in this optimizer's line, go on with the next
        line["error"] = f"{type(err).__name__}: {err}"[:500]
    line["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(line), flush=True)
PY

# ---- the steps ----------------------------------------------------------------------------------------
log "start: smoke=$SMOKE budget=${BUDGET}s python=$(command -v "$PY")"
TS=benchmarks/train_speed.py
if (( SMOKE )); then
  run_step train_speed_124M json 60 20 -- "$PY" "$TS" --smoke
  run_step train_speed_124M_doc_mask json 60 20 -- "$PY" "$TS" --smoke --doc-mask --peers ""
  run_step train_speed_350M_ac json 60 10 -- "$PY" "$TS" --smoke --ac none,selective,full --peers ""
  run_step train_speed_mlm json 60 10 -- "$PY" "$TS" --objective mlm --smoke
  run_step memory json 60 0 -- "$PY" "$WORK/memory_bench.py" --smoke
  echo '{"figure": "pytest_gpu", "pytest_gpu": "skipped: no GPU"}'
  SUMMARY+=("pytest_gpu=skipped")
else
  (( INSTALL )) && install
  if cuda_ok; then
    "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" >&2
  fi
  # Compile dominates each contender (~0.5-1 min cold), so few warm-up and timed steps; reserves are
  # the minimums the later steps keep: doc_mask 40, 350M 60, mlm 40, memory 40, pytest 60. doc_mask also
  # compiles FlexAttention's kernels (forward and backward) and create_block_mask, hence its larger cap.
  FAST=(--warmup 3 --steps 20)
  run_step train_speed_124M json 150 240 -- "$PY" "$TS" --preset 124M --micro-batch 16 --seq 1024 "${FAST[@]}"
  run_step train_speed_124M_doc_mask json 100 200 -- \
    "$PY" "$TS" --preset 124M --micro-batch 16 --seq 1024 --doc-mask --peers "" "${FAST[@]}"
  run_step train_speed_350M_ac json 150 140 -- \
    "$PY" "$TS" --preset 350M --micro-batch 16 --seq 1024 --ac none,selective,full --peers "" "${FAST[@]}"
  run_step train_speed_mlm json 90 100 -- \
    "$PY" "$TS" --objective mlm --preset 124M --micro-batch 16 --seq 1024 "${FAST[@]}"
  run_step memory json 70 60 -- "$PY" "$WORK/memory_bench.py"
  if cuda_ok; then
    # Collection errors elsewhere (an optional package missing) must not hide the GPU tests' result.
    run_step pytest_gpu pytest 120 0 -- "$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors
  else
    echo '{"figure": "pytest_gpu", "pytest_gpu": "skipped: no GPU", "error": "torch sees no CUDA device"}'
    FAILED=1; SUMMARY+=("pytest_gpu=no_gpu")
  fi
fi

"$PY" - "$SECONDS" "$FAILED" "${SUMMARY[@]}" <<'PY'
import json, sys
seconds, failed, *steps = sys.argv[1:]
print(json.dumps({"figure": "suite", "seconds": int(seconds), "failed": failed == "1",
                  "steps": dict(s.split("=", 1) for s in steps)}))
PY
log "done in ${SECONDS}s"
exit "$FAILED"
