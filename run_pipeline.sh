#!/usr/bin/env bash
# The whole MMT+ chain, data to submission (VisDA-2020 2nd-place system, see the slides in the README):
#
#   0. data        the embedded synthetic benchmark (make_demo_data.py), unless --data-root is given
#   1. encoder     pretrain.py on RAW source images: the re-ID encoder SDA's relation term needs
#   2. sda         sda.py train, then sda.py translate -> personX_sda/image_train (source-to-target images)
#   3. pretrain    pretrain.py on personX_sda, two seeds per backbone (init-1 / init-2 of MMT+); with the demo
#                  preset they start from the encoder's trunk (see DEMO_INIT below)
#   4. mmt         mmt_plus.py per backbone (two students + mean teachers, DSBN, MoCo)
#   5. camera      camera.py: camera classifier on the target training cameras
#   6. post        postprocess.py on target_val (ensemble + camera distance + re-ranking, metrics, ablation)
#                  and on target_test (result.txt / result.zip for the challenge server)
#
# Each stage writes a DONE marker into its output folder when its command succeeded; a re-run skips finished
# stages, so an interrupted pipeline continues where it stopped (an unfinished stage starts again, with --resume
# where its script supports it). One log per stage in WORK/stage_logs/. The last lines print the results table.
#
#   ./run_pipeline.sh                         # embedded benchmark, demo settings (the README's first command)
#   ./run_pipeline.sh --tiny                  # CI-sized: tiny dataset, a few iterations per stage
#   ./run_pipeline.sh --ablation              # + the ablation table (raw vs SDA pre-training, MMT vs MMT+,
#                                             #   single backbones vs ensemble, post-processing steps)
#   ./run_pipeline.sh --data-root /data/visda --preset none --archs "resnest50 densenet169_ibn"
#                                             # real VisDA-2020 data with the scripts' full (release) settings
#   ./run_pipeline.sh --source market1501 --source-root /data --target dukemtmc --target-root /data \
#       --val dukemtmc --val-root /data --no-test-submission     # Market-1501 -> DukeMTMC-reID
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

usage() {
    cat <<EOF
usage: $0 [--data-root DIR] [--work-dir DIR] [--tiny] [--preset NAME|none] [--archs "A B ..."]
          [--sda-arch ARCH] [--seeds "1 2"] [--workers N] [--no-test-submission] [--ablation]
          [--source NAME] [--source-root DIR] [--target NAME] [--target-root DIR] [--val NAME] [--val-root DIR]

  --data-root DIR   VisDA-2020 layout root (personX/, target_training/, target_validation/, target_test/, index
                    files). Default: generate the embedded benchmark into WORK/data. A real data root is never
                    written to: the pipeline works on WORK/data, a folder of symbolic links to its entries, and
                    writes the SDA translations (personX_sda/) there.
  --work-dir DIR    where everything goes (default: runs/pipeline, or runs/pipeline-tiny with --tiny)
  --tiny            CI-sized run: tiny generated dataset, 64x32 images, 1-2 epochs of a few iterations
  --preset NAME     --preset passed to every stage script (default: demo; 'none' = the scripts' full settings)
  --archs "A B"     backbones pre-trained, adapted with MMT+ and ensembled (default: resnet18)
  --sda-arch ARCH   backbone of SDA's relation encoders (default: the first of --archs)
  --seeds "1 2"     the two pre-training seeds (init-1 and init-2 of MMT+)
  --workers N       data-loading workers per stage (default: 0 on a machine with <= 2 CPU cores, where loading
                    in the training process is faster, else 2)
  --no-test-submission   skip post-processing target_test
  --source NAME, --source-root DIR, --target NAME, --target-root DIR, --val NAME, --val-root DIR
                    the datasets, as every stage takes them (see python pretrain.py --help; default: the VisDA-2020
                    names under --data-root). A source other than personx is translated by SDA into
                    WORK/data/<source>_sda/ (a list dataset) and pre-trained on from there.
  --ablation        after the pipeline, also pre-train on raw source images (both seeds), run the original MMT
                    (mmt_plus.py --mode mmt) from the same initialisations, evaluate every model alone and write
                    WORK/ablation/ablation.md (labelled target_val needed). Reuses every finished stage.
Environment: PYTHON (interpreter, default .venv/bin/python), EXTRA_<STAGE>_ARGS (extra flags for one stage:
  EXTRA_ENCODER_ARGS, EXTRA_SDA_ARGS, EXTRA_TRANSLATE_ARGS, EXTRA_PRETRAIN_ARGS, EXTRA_MMT_ARGS,
  EXTRA_CAMERA_ARGS, EXTRA_POST_ARGS).
EOF
}

DATA_ROOT=""
WORK=""
TINY=0
PRESET="demo"
ARCHS="resnet18"
SDA_ARCH=""
SEEDS="1 2"
WORKERS=""
TEST_SUBMISSION=1
ABLATION=0
SOURCE="personx"
TARGET="target_train"
VAL="target_val"
ROOT_ARGS=()   # --source-root/--target-root/--val-root as given
while [[ $# -gt 0 ]]; do
    case "$1" in
        --data-root) DATA_ROOT="$2"; shift 2 ;;
        --work-dir) WORK="$2"; shift 2 ;;
        --tiny) TINY=1; shift ;;
        --preset) PRESET="$2"; shift 2 ;;
        --archs) ARCHS="$2"; shift 2 ;;
        --sda-arch) SDA_ARCH="$2"; shift 2 ;;
        --seeds) SEEDS="$2"; shift 2 ;;
        --workers) WORKERS="$2"; shift 2 ;;
        --no-test-submission) TEST_SUBMISSION=0; shift ;;
        --ablation) ABLATION=1; shift ;;
        --source) SOURCE="$2"; shift 2 ;;
        --target) TARGET="$2"; shift 2 ;;
        --val) VAL="$2"; shift 2 ;;
        --source-root|--target-root|--val-root) ROOT_ARGS+=("$1" "$2"); shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run_pipeline.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
read -r -a ARCH_LIST <<< "$ARCHS"
read -r -a SEED_LIST <<< "$SEEDS"
if [[ ${#ARCH_LIST[@]} -lt 1 ]]; then echo "run_pipeline.sh: --archs is empty" >&2; exit 2; fi
if [[ ${#SEED_LIST[@]} -ne 2 ]]; then echo "run_pipeline.sh: --seeds needs exactly two seeds, got '$SEEDS'" >&2; exit 2; fi
SDA_ARCH="${SDA_ARCH:-${ARCH_LIST[0]}}"
DATASET_ARGS=(--target "$TARGET" --val "$VAL" "${ROOT_ARGS[@]}")  # each stage adds its --source
VISDA_VAL=0
if [[ "$VAL" == "target_val" ]]; then VISDA_VAL=1; fi
if [[ $VISDA_VAL -eq 0 ]]; then TEST_SUBMISSION=0; fi # the challenge submission is VisDA-2020's
if [[ $ABLATION -eq 1 && ( "$SOURCE" != "personx" || $VISDA_VAL -eq 0 ) ]]; then
    echo "run_pipeline.sh: --ablation compares raw and SDA PersonX pre-training on target_val (VisDA-2020 layout)" >&2
    exit 2
fi
# without --workers each stage uses its own default (reid.default_workers)
WORKER_ARGS=()
if [[ -n "$WORKERS" ]]; then WORKER_ARGS=(--workers "$WORKERS"); fi
if [[ -z "$WORK" ]]; then
    if [[ $TINY -eq 1 ]]; then WORK="runs/pipeline-tiny"; else WORK="runs/pipeline"; fi
fi
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
LOG_DIR="$WORK/stage_logs"
mkdir -p "$LOG_DIR"

PRESET_ARGS=()
if [[ "$PRESET" != "none" ]]; then PRESET_ARGS=(--preset "$PRESET"); fi

# Per-stage budget overrides for --tiny (explicit flags win over each script's preset).
TINY_SIZE=()
TINY_ENCODER=()
TINY_SDA=()
TINY_PRETRAIN=()
TINY_MMT=()
TINY_CAMERA=()
# The demo networks start from random weights (no ImageNet weights offline), so a from-scratch pre-training needs
# the whole 10 x 30 iterations (8 x 30 reached 35.7 mAP instead of 49.5). SDA's source encoder is such a run;
# the pre-trainings after it (SDA-translated images, and the ablation's raw-image and target-label runs) start
# from its trunk, the role ImageNet weights play in the release, and get 5 x 30 iterations. Measured on 2 cores
# (seed 1/2 from the encoder at 49.5): 54.3 mAP on raw images, 40.2 on SDA images; two from-scratch pre-trainings
# instead would not fit the main job into 20 minutes on a CPU without AMX.
FINETUNE_BUDGET=()
if [[ $TINY -eq 0 ]]; then FINETUNE_BUDGET=(--epochs 5 --milestones 3 4 --eval-every 5); fi
if [[ $TINY -eq 1 ]]; then
    TINY_SIZE=(--height 64 --width 32)
    TINY_ENCODER=("${TINY_SIZE[@]}" --epochs 1 --iters 2 --batch-size 16 --eval-every 1)
    TINY_SDA=("${TINY_SIZE[@]}" --epochs-constant 1 --epochs-decay 0 --iters 2 --batch-size 8 --ngf 8 --ndf 8
              --n-blocks 1)
    TINY_PRETRAIN=("${TINY_SIZE[@]}" --epochs 1 --iters 2 --batch-size 16 --eval-every 1)
    TINY_MMT=("${TINY_SIZE[@]}" --epochs 1 --iters 2 --batch-size 16 --no-eval-initial)
    TINY_CAMERA=("${TINY_SIZE[@]}" --epochs 1 --iters 2 --batch-size 16 --eval-step 1 --warmup-epochs 1)
fi
read -r -a EXTRA_ENCODER <<< "${EXTRA_ENCODER_ARGS:-}"
read -r -a EXTRA_SDA <<< "${EXTRA_SDA_ARGS:-}"
read -r -a EXTRA_TRANSLATE <<< "${EXTRA_TRANSLATE_ARGS:-}"
read -r -a EXTRA_PRETRAIN <<< "${EXTRA_PRETRAIN_ARGS:-}"
read -r -a EXTRA_MMT <<< "${EXTRA_MMT_ARGS:-}"
read -r -a EXTRA_CAMERA <<< "${EXTRA_CAMERA_ARGS:-}"
read -r -a EXTRA_POST <<< "${EXTRA_POST_ARGS:-}"

# run_stage NAME OUTPUT_DIR COMMAND...: skip if OUTPUT_DIR/DONE exists, else run COMMAND with its output in
# stage_logs/NAME.log and write the marker atomically on success. The marker records the command; with
# RERUN_IF_CHANGED=1 (the cheap evaluation stages) a marker written by a different command does not count, so
# e.g. a new --archs list re-evaluates the ensemble instead of showing the old table.
RERUN_IF_CHANGED=0
run_stage() {
    local name="$1" out_dir="$2"
    shift 2
    local command_text
    command_text="$(printf ' %q' "$@")"
    if [[ -f "$out_dir/DONE" ]]; then
        if [[ $RERUN_IF_CHANGED -eq 0 ]] || grep -qxF "command:$command_text" "$out_dir/DONE"; then
            echo "[pipeline] $name: finished before ($out_dir/DONE), skipped"
            return 0
        fi
        echo "[pipeline] $name: finished before with a different command, running again"
        rm -f "$out_dir/DONE"
    fi
    mkdir -p "$out_dir"
    local log="$LOG_DIR/$name.log" start=$SECONDS status=0
    echo "[pipeline] $name: started $(date -u +%H:%M:%S), log $log"
    {
        echo "# $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
        echo "#$command_text"
    } >> "$log"
    "$@" >> "$log" 2>&1 || status=$?
    if [[ $status -ne 0 ]]; then
        echo "[pipeline] $name: FAILED (exit $status) after $((SECONDS - start)) s; last lines of $log:" >&2
        tail -n 25 "$log" >&2
        exit "$status"
    fi
    {
        echo "finished $(date -u '+%Y-%m-%d %H:%M:%S UTC') in $((SECONDS - start)) s"
        echo "command:$command_text"
    } > "$out_dir/.DONE.tmp"
    mv "$out_dir/.DONE.tmp" "$out_dir/DONE"
    echo "[pipeline] $name: done in $((SECONDS - start)) s"
}

# The checkpoint each training stage keeps as its result (selected on target validation).
best_checkpoint() {
    local dir="$1" candidate
    for candidate in model_best.pth model_best.pt model_best.pth.tar; do
        if [[ -f "$dir/$candidate" ]]; then echo "$dir/$candidate"; return 0; fi
    done
    echo "run_pipeline.sh: no model_best checkpoint in $dir" >&2
    return 1
}

# ---------------------------------------------------------------------------------------------------------------
# 0. data
DATA="$WORK/data"
if [[ -z "$DATA_ROOT" && ${#ROOT_ARGS[@]} -eq 6 ]]; then
    mkdir -p "$DATA" # every dataset has its own root: no benchmark; WORK/data receives the translations only
elif [[ -z "$DATA_ROOT" ]]; then
    DATA_ARGS=(--out "$DATA" --seed 0 --overwrite) # only re-run when unfinished: replace a partial tree
    if [[ $TINY -eq 1 ]]; then DATA_ARGS+=(--preset tiny); fi
    run_stage data "$WORK/data_done" "$PYTHON" "$REPO/make_demo_data.py" "${DATA_ARGS[@]}"
else
    if [[ ! -d "$DATA_ROOT" ]]; then echo "run_pipeline.sh: --data-root $DATA_ROOT is not a folder" >&2; exit 2; fi
    DATA_ROOT="$(cd "$DATA_ROOT" && pwd)"
    mkdir -p "$DATA"
    for entry in "$DATA_ROOT"/*; do
        name="$(basename "$entry")"
        [[ "$name" == *_sda ]] && continue # always re-translated by this pipeline, into WORK/data
        [[ -e "$DATA/$name" ]] || ln -s "$entry" "$DATA/$name"
    done
fi

# ---------------------------------------------------------------------------------------------------------------
# 1. source encoder for SDA's relation consistency: pre-trained on raw source images
ENCODER_DIR="$WORK/encoder-personx-$SDA_ARCH"
run_stage encoder "$ENCODER_DIR" "$PYTHON" "$REPO/pretrain.py" "${PRESET_ARGS[@]}" --data-root "$DATA" \
    "${DATASET_ARGS[@]}" --source "$SOURCE" --arch "$SDA_ARCH" --seed "${SEED_LIST[0]}" "${WORKER_ARGS[@]}" \
    --logs-dir "$ENCODER_DIR" "${TINY_ENCODER[@]}" "${EXTRA_ENCODER[@]}"

# ---------------------------------------------------------------------------------------------------------------
# 2. SDA: train the translator, then write personX_sda/image_train into the work data root
SDA_DIR="$WORK/sda"
SDA_RESUME=()
if [[ -f "$SDA_DIR/checkpoint.pt" ]]; then SDA_RESUME=(--resume); fi
ENCODER_CHECKPOINT="$(best_checkpoint "$ENCODER_DIR")"
# pre-training initialisation of backbone $1: the encoder's trunk with the demo preset (same backbone only)
DEMO_INIT=()
demo_init() {
    DEMO_INIT=()
    if [[ "$PRESET" == "demo" && "$1" == "$SDA_ARCH" ]]; then
        DEMO_INIT=(--pretrained "$ENCODER_CHECKPOINT" "${FINETUNE_BUDGET[@]}")
    fi
}
run_stage sda "$SDA_DIR" "$PYTHON" "$REPO/sda.py" train "${PRESET_ARGS[@]}" --data-root "$DATA" --out "$SDA_DIR" \
    "${DATASET_ARGS[@]}" --source "$SOURCE" \
    --arch "$SDA_ARCH" --source-encoder "$ENCODER_CHECKPOINT" --seed "${SEED_LIST[0]}" \
    "${WORKER_ARGS[@]}" "${SDA_RESUME[@]}" "${TINY_SDA[@]}" "${EXTRA_SDA[@]}"
run_stage translate "$WORK/translate_done" "$PYTHON" "$REPO/sda.py" translate --checkpoint "$SDA_DIR/checkpoint.pt" \
    --data-root "$DATA" "${DATASET_ARGS[@]}" --source "$SOURCE" --out "$DATA" "${WORKER_ARGS[@]}" "${EXTRA_TRANSLATE[@]}"
# the translated source: personX_sda/ of the VisDA layout, else a list dataset WORK/data/<source>_sda/
TRANSLATED=(--source personx_sda)
if [[ "$SOURCE" != "personx" ]]; then
    name="$(PYTHONPATH="$REPO" "$PYTHON" -c 'import sys, reid; print(reid.canonical_dataset_name(sys.argv[1]))' "$SOURCE")"
    TRANSLATED=(--source list --source-root "$DATA/${name}_sda")
fi

# ---------------------------------------------------------------------------------------------------------------
# 3. pre-training on the translated images, two seeds per backbone; 4. MMT+ per backbone
MMT_CHECKPOINTS=()
for arch in "${ARCH_LIST[@]}"; do
    INIT=()
    demo_init "$arch"
    for seed in "${SEED_LIST[@]}"; do
        dir="$WORK/pretrain-personx_sda-$arch-$seed"
        run_stage "pretrain-$arch-$seed" "$dir" "$PYTHON" "$REPO/pretrain.py" "${PRESET_ARGS[@]}" --data-root "$DATA" \
            "${DATASET_ARGS[@]}" "${TRANSLATED[@]}" --arch "$arch" --seed "$seed" "${WORKER_ARGS[@]}" --logs-dir "$dir" \
            "${DEMO_INIT[@]}" "${TINY_PRETRAIN[@]}" "${EXTRA_PRETRAIN[@]}"
        checkpoint="$(best_checkpoint "$dir")"
        INIT+=("$checkpoint")
    done
    dir="$WORK/mmt-$arch"
    run_stage "mmt-$arch" "$dir" "$PYTHON" "$REPO/mmt_plus.py" "${PRESET_ARGS[@]}" --data-root "$DATA" --arch "$arch" \
        "${DATASET_ARGS[@]}" --source "$SOURCE" \
        --init-1 "${INIT[0]}" --init-2 "${INIT[1]}" --seed "${SEED_LIST[0]}" "${WORKER_ARGS[@]}" --logs-dir "$dir" --resume \
        "${TINY_MMT[@]}" "${EXTRA_MMT[@]}"
    checkpoint="$(best_checkpoint "$dir")"
    MMT_CHECKPOINTS+=("$checkpoint")
done

# ---------------------------------------------------------------------------------------------------------------
# 5. camera classifier (slides: ResNeSt-50; the demo preset uses a small backbone)
CAMERA_DIR="$WORK/camera"
run_stage camera "$CAMERA_DIR" "$PYTHON" "$REPO/camera.py" "${PRESET_ARGS[@]}" --data-root "$DATA" "${DATASET_ARGS[@]}" \
    --logs-dir "$CAMERA_DIR" --seed "${SEED_LIST[0]}" "${WORKER_ARGS[@]}" --resume \
    "${TINY_CAMERA[@]}" "${EXTRA_CAMERA[@]}"

# ---------------------------------------------------------------------------------------------------------------
# 6. post-processing: evaluation + ablation on target_val, challenge submission on target_test
CAMERA_CHECKPOINT="$(best_checkpoint "$CAMERA_DIR")"
POST_ARGS=(--checkpoints "${MMT_CHECKPOINTS[@]}" --camera-checkpoint "$CAMERA_CHECKPOINT"
           --data-root "$DATA" "${WORKER_ARGS[@]}")
if [[ -n "$DATA_ROOT" && $VISDA_VAL -eq 1 ]]; then POST_ARGS+=(--ap-topk 100); fi # the VisDA server's top-100 AP on real data
RERUN_IF_CHANGED=1 # post-processing reads cached features: cheap to redo when the inputs changed
run_stage post-val "$WORK/post-val" "$PYTHON" "$REPO/postprocess.py" "${POST_ARGS[@]}" "${DATASET_ARGS[@]}" \
    --out "$WORK/post-val" --ablation "${EXTRA_POST[@]}"
if [[ $TEST_SUBMISSION -eq 1 ]]; then
    run_stage post-test "$WORK/post-test" "$PYTHON" "$REPO/postprocess.py" "${POST_ARGS[@]}" --dataset target_test \
        --out "$WORK/post-test" --num-figures 4 "${EXTRA_POST[@]}"
fi

# ---------------------------------------------------------------------------------------------------------------
# 7. ablation (--ablation): the extra trainings, each model evaluated alone (no camera term, no re-ranking, flip
#    averaging as in post-val), then one table with the pre-training, MMT and post-processing rows.
if [[ $ABLATION -eq 1 ]]; then
    ABLATION_DIR="$WORK/ablation"
    mkdir -p "$ABLATION_DIR"
    RERUN_IF_CHANGED=0 # trainings
    arch="${ARCH_LIST[0]}"
    demo_init "$arch"
    RAW_CHECKPOINTS=()
    for seed in "${SEED_LIST[@]}"; do
        dir="$WORK/pretrain-personx-$arch-$seed" # as the SDA pre-trainings, on raw source images
        run_stage "pretrain-raw-$arch-$seed" "$dir" "$PYTHON" "$REPO/pretrain.py" "${PRESET_ARGS[@]}" \
            --data-root "$DATA" --source personx --arch "$arch" --seed "$seed" "${WORKER_ARGS[@]}" \
            --logs-dir "$dir" "${DEMO_INIT[@]}" "${TINY_PRETRAIN[@]}" "${EXTRA_PRETRAIN[@]}"
        RAW_CHECKPOINTS+=("$(best_checkpoint "$dir")")
    done
    SDA_CHECKPOINTS=()
    for seed in "${SEED_LIST[@]}"; do
        SDA_CHECKPOINTS+=("$(best_checkpoint "$WORK/pretrain-personx_sda-$arch-$seed")")
    done
    dir="$WORK/mmt-original-$arch"
    run_stage "mmt-original-$arch" "$dir" "$PYTHON" "$REPO/mmt_plus.py" "${PRESET_ARGS[@]}" --mode mmt \
        --data-root "$DATA" --arch "$arch" --init-1 "${SDA_CHECKPOINTS[0]}" --init-2 "${SDA_CHECKPOINTS[1]}" \
        --seed "${SEED_LIST[0]}" "${WORKER_ARGS[@]}" --logs-dir "$dir" --resume "${TINY_MMT[@]}" "${EXTRA_MMT[@]}"
    MMT_ORIGINAL_CHECKPOINT="$(best_checkpoint "$dir")"
    dir="$WORK/mmt-from-raw-$arch" # MMT+ as in the pipeline, but from the raw-source pre-trainings
    run_stage "mmt-from-raw-$arch" "$dir" "$PYTHON" "$REPO/mmt_plus.py" "${PRESET_ARGS[@]}" --data-root "$DATA" \
        --arch "$arch" --init-1 "${RAW_CHECKPOINTS[0]}" --init-2 "${RAW_CHECKPOINTS[1]}" --seed "${SEED_LIST[0]}" \
        "${WORKER_ARGS[@]}" --logs-dir "$dir" --resume "${TINY_MMT[@]}" "${EXTRA_MMT[@]}"
    MMT_FROM_RAW_CHECKPOINT="$(best_checkpoint "$dir")"
    # DIAGNOSTICS ONLY (they read the benchmark's ground truth, never a method): MMT+ with the true identities as
    # pseudo labels (what self-training could reach at this budget with perfect clusters), and pre-training on the
    # labelled target training set (what the target data itself teaches).
    if [[ -z "$DATA_ROOT" ]]; then
        dir="$WORK/mmt-oracle-$arch"
        run_stage "mmt-oracle-$arch" "$dir" "$PYTHON" "$REPO/mmt_plus.py" "${PRESET_ARGS[@]}" --oracle-pseudo-labels \
            --data-root "$DATA" --arch "$arch" --init-1 "${SDA_CHECKPOINTS[0]}" --init-2 "${SDA_CHECKPOINTS[1]}" \
            --seed "${SEED_LIST[0]}" "${WORKER_ARGS[@]}" --logs-dir "$dir" --resume "${TINY_MMT[@]}" "${EXTRA_MMT[@]}"
        MMT_ORACLE_CHECKPOINT="$(best_checkpoint "$dir")"
        dir="$WORK/pretrain-target-labels-$arch-${SEED_LIST[0]}"
        run_stage "pretrain-target-labels-$arch" "$dir" "$PYTHON" "$REPO/pretrain.py" "${PRESET_ARGS[@]}" \
            --target-labels-upper-bound --data-root "$DATA" --arch "$arch" --seed "${SEED_LIST[0]}" \
            "${WORKER_ARGS[@]}" --logs-dir "$dir" "${DEMO_INIT[@]}" "${TINY_PRETRAIN[@]}" "${EXTRA_PRETRAIN[@]}"
        TARGET_LABELS_CHECKPOINT="$(best_checkpoint "$dir")"
    fi

    # name|checkpoint pairs evaluated alone
    SINGLE=("encoder|$ENCODER_CHECKPOINT" "raw-${SEED_LIST[0]}|${RAW_CHECKPOINTS[0]}" "raw-${SEED_LIST[1]}|${RAW_CHECKPOINTS[1]}"
            "sda-${SEED_LIST[0]}|${SDA_CHECKPOINTS[0]}" "sda-${SEED_LIST[1]}|${SDA_CHECKPOINTS[1]}"
            "mmt|$MMT_ORIGINAL_CHECKPOINT" "mmt+-from-raw|$MMT_FROM_RAW_CHECKPOINT")
    for index in "${!ARCH_LIST[@]}"; do SINGLE+=("mmt+-${ARCH_LIST[$index]}|${MMT_CHECKPOINTS[$index]}"); done
    if [[ -z "$DATA_ROOT" ]]; then
        SINGLE+=("mmt+-oracle|$MMT_ORACLE_CHECKPOINT" "target-labels|$TARGET_LABELS_CHECKPOINT")
    fi
    RERUN_IF_CHANGED=1 # evaluations
    for entry in "${SINGLE[@]}"; do
        name="${entry%%|*}"
        run_stage "eval-$name" "$ABLATION_DIR/eval-$name" "$PYTHON" "$REPO/postprocess.py" --checkpoints "${entry#*|}" \
            --data-root "$DATA" --dataset target_val --no-rerank --out "$ABLATION_DIR/eval-$name" \
            --cache-dir "$ABLATION_DIR/feature_cache" --num-figures 0 "${WORKER_ARGS[@]}" "${EXTRA_POST[@]}"
    done
    # an ensemble that needs no extra training: the MMT+ models from the SDA and from the raw initialisations,
    # each alone and together, with every post-processing step off/on (a second backbone: --archs "A B")
    run_stage ensemble "$ABLATION_DIR/ensemble" "$PYTHON" "$REPO/postprocess.py" \
        --checkpoints "${MMT_CHECKPOINTS[0]}" "$MMT_FROM_RAW_CHECKPOINT" --camera-checkpoint "$CAMERA_CHECKPOINT" \
        --data-root "$DATA" --dataset target_val --out "$ABLATION_DIR/ensemble" --ablation \
        --cache-dir "$ABLATION_DIR/feature_cache" --num-figures 0 "${WORKER_ARGS[@]}" "${EXTRA_POST[@]}"
    "$PYTHON" - "$WORK" "$ENCODER_DIR" "$arch" "${SEED_LIST[@]}" "${ARCH_LIST[@]}" <<'PYTHON'
# Collect the ablation rows into WORK/ablation/ablation.md (metrics from postprocess.py's results.json, the
# pseudo-label quality per epoch from mmt_plus.py's log.jsonl).
import json, sys
from pathlib import Path

work, encoder, arch, seed_1, seed_2 = Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:6]
archs = sys.argv[6:]
ablation = work / "ablation"


def final_row(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())["final"]


def cells(row: dict) -> str:
    return " | ".join(f"{100 * row[key]:.1f}" for key in ("mAP", "top1", "top5"))


def initialisation(run: Path) -> str:
    """How a pretrain.py run started: random weights, SDA's source encoder, or another --pretrained file."""
    pretrained = json.loads((run / "args.json").read_text()).get("pretrained")
    if not pretrained:
        return "random"
    if Path(pretrained).resolve().parent == encoder.resolve():
        return "the encoder's trunk"
    return f"`{Path(pretrained).name}`"


def budget(run: Path) -> str:
    args = json.loads((run / "args.json").read_text())
    return f"{args['epochs']} x {args['iters']} it."


lines = [f"### Stage II and III, {arch}, each model alone (flip averaging, no camera term, no re-ranking)", "",
         "| model | initialised from | mAP | top-1 | top-5 |", "|---|---|---|---|---|",
         f"| pre-trained on raw source images, seed {seed_1}: SDA's source encoder ({budget(encoder)}) "
         f"| {initialisation(encoder)} | {cells(final_row(ablation / 'eval-encoder'))} |"]
for kind, label, folder in (("raw", "pre-trained on raw source images", "personx"),
                            ("sda", "pre-trained on SDA-translated images", "personx_sda")):
    for seed in (seed_1, seed_2):
        run = work / f"pretrain-{folder}-{arch}-{seed}"
        lines.append(f"| {label}, seed {seed} ({budget(run)}) | {initialisation(run)} "
                     f"| {cells(final_row(ablation / f'eval-{kind}-{seed}'))} |")
lines.append(f"| MMT (`--mode mmt`) | SDA seeds {seed_1}+{seed_2} | {cells(final_row(ablation / 'eval-mmt'))} |")
lines.append(f"| MMT+ | SDA seeds {seed_1}+{seed_2} | {cells(final_row(ablation / f'eval-mmt+-{arch}'))} |")
lines.append(f"| MMT+ | raw seeds {seed_1}+{seed_2} | {cells(final_row(ablation / 'eval-mmt+-from-raw'))} |")
for other in archs[1:]:
    lines.append(f"| MMT+ {other} | SDA seeds {seed_1}+{seed_2} | {cells(final_row(ablation / f'eval-mmt+-{other}'))} |")
diagnostics = [("mmt+-oracle", "MMT+ with the TRUE identities as pseudo labels (diagnostics only)",
                f"SDA seeds {seed_1}+{seed_2}"),
               ("target-labels", "pre-trained on target_train WITH its identity labels (diagnostics only)",
                initialisation(work / f"pretrain-target-labels-{arch}-{seed_1}")
                if (work / f"pretrain-target-labels-{arch}-{seed_1}" / "args.json").is_file() else "-")]
for name, label, init in diagnostics:
    if (ablation / f"eval-{name}" / "results.json").is_file():
        lines.append(f"| {label} | {init} | {cells(final_row(ablation / f'eval-{name}'))} |")



def epochs(log: Path) -> dict:
    """epoch -> its record; epoch 0 = the initial teachers (the pre-trained models)."""
    records = {}
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if "val" in record and "epoch" in record:
            records[record["epoch"]] = record
    return records


def epoch_cells(record: dict | None) -> str:
    if record is None:
        return " | ".join(["-"] * 6)
    best_val = max(100 * teacher["mAP"] for teacher in record["val"])  # the better of the two mean teachers
    if "clusters" not in record:
        return f"- | - | - | - | - | {best_val:.1f}"
    quality = record.get("pseudo_labels", {})
    nmi, purity, camera = (f"{quality[key]:.3f}" if key in quality else "-" for key in ("nmi", "purity", "camera_purity"))
    return f"{record['clusters']} | {100 * record['outlier_fraction']:.0f}% | {nmi} | {purity} | {camera} | {best_val:.1f}"


mmt, mmt_plus = epochs(work / f"mmt-original-{arch}" / "log.jsonl"), epochs(work / f"mmt-{arch}" / "log.jsonl")
# camera purity of the TRUE identities of the clustered images (it varies a little with the outliers left out)
true_camera = [r["pseudo_labels"]["true_camera_purity"] for r in (*mmt.values(), *mmt_plus.values())
               if "true_camera_purity" in r.get("pseudo_labels", {})]
reference = "-"
if true_camera:
    low, high = min(true_camera), max(true_camera)
    reference = f"{low:.3f}" if round(low, 3) == round(high, 3) else f"{low:.3f}-{high:.3f}"
lines += ["", "### Pseudo-label quality per epoch (target training set, against the generator's identities)", "",
          "Purity: share of clustered images that belong to their cluster's most common identity. Camera purity: "
          f"share taken by the cluster's most common camera (the true identities of the same images: {reference}); "
          "clusters more camera-pure than that group images by camera style, not by person. "
          "Val mAP: the better mean teacher on target_val, no flip.", "",
          "| epoch | MMT clusters | MMT outliers | MMT NMI | MMT purity | MMT camera purity | MMT val mAP "
          "| MMT+ clusters | MMT+ outliers | MMT+ NMI | MMT+ purity | MMT+ camera purity | MMT+ val mAP |",
          "|---" * 13 + "|"]
for epoch in sorted(set(mmt) | set(mmt_plus)):
    lines.append(f"| {epoch} | {epoch_cells(mmt.get(epoch))} | {epoch_cells(mmt_plus.get(epoch))} |")
oracle_log = work / f"mmt-oracle-{arch}" / "log.jsonl"
if oracle_log.is_file():
    oracle = epochs(oracle_log)
    lines += ["", "MMT+ with the true identities as pseudo labels (diagnostics only), better teacher's val mAP per "
              "epoch: " + ", ".join(f"{e}: {max(100 * t['mAP'] for t in oracle[e]['val']):.1f}" for e in sorted(oracle))]

lines += ["", "### Post-processing of the pipeline's model(s) (target_val, post-val/results.md)", "",
          (work / "post-val" / "results.md").read_text().split("\n", 2)[2].strip(),
          "", f"### Ensemble of the two MMT+ {arch} models (SDA and raw initialisations; ensemble/results.md)", "",
          "Models: 1 = MMT+ from the SDA pre-trainings, 2 = MMT+ from the raw pre-trainings.", "",
          (ablation / "ensemble" / "results.md").read_text().split("\n", 2)[2].strip()]
text = "\n".join(lines) + "\n"
temporary = ablation / ".ablation.md.tmp"
temporary.write_text(text)
temporary.replace(ablation / "ablation.md")
print(text)
PYTHON
fi

echo
if [[ -z "$DATA_ROOT" ]]; then echo "(embedded synthetic benchmark: these are synthetic-benchmark results)"; fi
cat "$WORK/post-val/results.md"
echo
echo "[pipeline] all stages done in $WORK"
if [[ $TEST_SUBMISSION -eq 1 ]]; then echo "[pipeline] challenge submission: $WORK/post-test/result.zip"; fi
