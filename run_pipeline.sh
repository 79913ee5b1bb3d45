#!/usr/bin/env bash
# The whole MMT+ chain, data to submission (VisDA-2020 2nd-place system, see the slides in the README):
#
#   0. data        the embedded synthetic benchmark (make_demo_data.py), unless --data-root is given
#   1. encoder     pretrain.py on RAW source images (per backbone with the demo preset): SDA's source encoder, and
#                  with the demo preset the initialisation of the later pre-trainings (the role of ImageNet weights)
#   2. baseline    a short clustering baseline on the target (mmt_plus.py --mode mmt from the encoder): the
#                  target-domain encoder of SDA's relation term
#   3. sda         sda.py train (--source-encoder, --target-encoder), then sda.py translate -> personX_sda/image_train
#   4. pretrain    pretrain.py on personX_sda, two seeds per backbone (init-1 / init-2 of MMT+)
#   5. mmt         mmt_plus.py per backbone (two students + mean teachers, DSBN, MoCo)
#   6. camera      camera.py: camera classifier on the target training cameras
#   7. post        postprocess.py on target_val (ensemble + camera distance + re-ranking, metrics, ablation)
#                  and on target_test (result.txt / result.zip for the challenge server)
#
# Each stage writes a DONE marker into its output folder when its command succeeded; a re-run skips finished
# stages, so an interrupted pipeline continues where it stopped (an unfinished stage starts again, with --resume
# where its script supports it). One log per stage in WORK/stage_logs/. The last lines print the results table.
#
#   ./run_pipeline.sh                         # embedded benchmark, demo settings (the README's first command)
#   ./run_pipeline.sh --tiny                  # CI-sized: tiny dataset, a few iterations per stage
#   ./run_pipeline.sh --ablation              # + the seed's ablations as a paired experiment, two seeds per row:
#                                             #   raw vs SDA pre-training, MMT vs MMT+, post-processing steps, two
#                                             #   backbones vs their ensemble, diagnostics -> WORK/ablation/
#   ./run_pipeline.sh --data-root /data/visda --preset none --archs "resnest50 densenet169_ibn"
#                                             # real VisDA-2020 data with the scripts' full (release) settings
#   ./run_pipeline.sh --source market1501 --source-root /data --target dukemtmc --target-root /data \
#       --val dukemtmc --val-root /data           # Market-1501 -> DukeMTMC-reID (README: "Your own datasets")
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

usage() {
    cat <<EOF
usage: $0 [--data-root DIR] [--work-dir DIR] [--tiny] [--preset NAME|none] [--archs "A B ..."]
          [--sda-arch ARCH] [--seeds "1 2"] [--workers N] [--ap-topk N|full] [--no-test-submission]
          [--ablation] [--ablation-seeds "1 2"] [--ensemble-arch ARCH] [--prune-resume-state]
          [--source NAME] [--source-root DIR] [--target NAME] [--target-root DIR] [--val NAME] [--val-root DIR]

  --data-root DIR   VisDA-2020 layout root (personX/, target_training/, target_validation/, target_test/, index
                    files). Default: generate the embedded benchmark into WORK/data. A real data root is never
                    written to: the pipeline works on WORK/data, a folder of symbolic links to its entries, and
                    writes the SDA translations (personX_sda/) there.
  --work-dir DIR    where everything goes (default: runs/pipeline, or runs/pipeline-tiny with --tiny)
  --tiny            CI-sized run: tiny generated dataset, 64x32 images, 1-2 epochs of a few iterations
  --preset NAME     --preset passed to every stage script (default: demo; 'none' = the scripts' full settings)
  --archs "A B"     backbones pre-trained, adapted with MMT+ and ensembled (default: resnet18)
  --sda-arch ARCH   backbone of SDA's relation encoders and of the clustering baseline (default: first of --archs)
  --seeds "1 2"     the two pre-training seeds (init-1 and init-2 of MMT+)
  --workers N       data-loading workers per stage (default: 0 on a machine with <= 2 CPU cores, where loading
                    in the training process is faster, else 2)
  --ap-topk N|full  the AP of every evaluation (post-val and the ablation alike): 100 = the VisDA-2020 server's
                    top-100 AP (default with --data-root), full = every gallery rank (default on the embedded
                    benchmark)
  --no-test-submission   skip post-processing target_test
  --ablation        after the pipeline, the seed's ablations as a paired experiment (labelled target_val needed):
                    pre-training on raw vs SDA-translated images (same initialisation and budget), original MMT
                    vs MMT+ (same two initialisations, same budget), each post-processing step, MMT+ of two
                    different backbones vs their ensemble, and diagnostics that read ground truth (MMT+ with
                    the true identities, the target-label bound, the perfect-translator control). Every row: one
                    run per ablation seed. Writes WORK/ablation/ablation.md and ablation.json
                    (ablation_report.py). Reuses every finished stage.
  --ablation-seeds "1 2"   seeds of every ablation row (default: --seeds; "1 2 3" where the spread exceeds an
                    effect). Pre-training rows: the pre-training seed; MMT rows: the MMT training seed, always
                    from the two pre-trainings of --seeds
  --source NAME, --source-root DIR, --target NAME, --target-root DIR, --val NAME, --val-root DIR
                    the datasets, as every stage takes them (python pretrain.py --help; default: the VisDA-2020
                    names under --data-root). A source other than personx is translated by SDA into
                    WORK/data/<source>_sda/ (a list dataset) and pre-trained on from there; outside VisDA-2020
                    there is no challenge submission and no --ablation.
  --ensemble-arch ARCH     the ablation's second backbone when --archs names one (default: resnet18_ibn)
  --prune-resume-state     delete a training stage's resume state (checkpoint.pth: students, teachers, optimizer)
                    once the stage has finished and written model_best.pth, its result. A finished stage is never
                    resumed, so nothing the pipeline reads is lost; an MMT+ resume state of ResNet-18 is ~400 MB
                    and --ablation writes about twenty. SDA's checkpoint (the translator) is always kept.
Environment: PYTHON (interpreter, default .venv/bin/python), EXTRA_<STAGE>_ARGS (extra flags for one stage:
  EXTRA_ENCODER_ARGS, EXTRA_BASELINE_ARGS, EXTRA_SDA_ARGS, EXTRA_TRANSLATE_ARGS, EXTRA_PRETRAIN_ARGS,
  EXTRA_MMT_ARGS, EXTRA_CAMERA_ARGS, EXTRA_POST_ARGS).
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
AP_TOPK=""
TEST_SUBMISSION=1
ABLATION=0
ABLATION_SEEDS=""
ENSEMBLE_ARCH="resnet18_ibn"
PRUNE_RESUME_STATE=0
SOURCE="personx"
TARGET="target_train"
VAL="target_val"
ROOT_ARGS=() # --source-root/--target-root/--val-root as given
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
        --ap-topk) AP_TOPK="$2"; shift 2 ;;
        --no-test-submission) TEST_SUBMISSION=0; shift ;;
        --ablation) ABLATION=1; shift ;;
        --ablation-seeds) ABLATION_SEEDS="$2"; shift 2 ;;
        --ensemble-arch) ENSEMBLE_ARCH="$2"; shift 2 ;;
        --prune-resume-state) PRUNE_RESUME_STATE=1; shift ;;
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
read -r -a ABLATION_SEED_LIST <<< "${ABLATION_SEEDS:-$SEEDS}"
if [[ ${#ARCH_LIST[@]} -lt 1 ]]; then echo "run_pipeline.sh: --archs is empty" >&2; exit 2; fi
if [[ ${#SEED_LIST[@]} -ne 2 ]]; then echo "run_pipeline.sh: --seeds needs exactly two seeds, got '$SEEDS'" >&2; exit 2; fi
if [[ ${#ABLATION_SEED_LIST[@]} -lt 2 ]]; then
    echo "run_pipeline.sh: --ablation-seeds needs two seeds or more, got '$ABLATION_SEEDS'" >&2
    exit 2
fi
SDA_ARCH="${SDA_ARCH:-${ARCH_LIST[0]}}"
DATASET_ARGS=(--target "$TARGET" --val "$VAL" "${ROOT_ARGS[@]}") # every stage gets these (and its --source)
VISDA_VAL=0
if [[ "$VAL" == "target_val" ]]; then VISDA_VAL=1; else TEST_SUBMISSION=0; fi # the submission is VisDA-2020's
if [[ $ABLATION -eq 1 && ( "$SOURCE" != "personx" || $VISDA_VAL -eq 0 ) ]]; then
    echo "run_pipeline.sh: --ablation needs the VisDA-2020 datasets (personx, target_val)" >&2
    exit 2
fi
# one metric for every evaluation of a run, so that every table compares like with like
if [[ -z "$AP_TOPK" ]]; then
    if [[ -n "$DATA_ROOT" && $VISDA_VAL -eq 1 ]]; then AP_TOPK=100; else AP_TOPK=full; fi
fi
METRIC_ARGS=()
if [[ "$AP_TOPK" != "full" ]]; then
    if ! [[ "$AP_TOPK" =~ ^[1-9][0-9]*$ ]]; then
        echo "run_pipeline.sh: --ap-topk takes a positive number or 'full', got '$AP_TOPK'" >&2
        exit 2
    fi
    METRIC_ARGS=(--ap-topk "$AP_TOPK")
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
# The demo networks start from random weights (no ImageNet weights offline). Each backbone's raw-source pre-training
# (its "encoder"; for the SDA backbone also SDA's source encoder) is such a run, and everything after it inherits its
# strength: the pre-trainings after it (SDA-translated images, and the ablation's raw-image and target-label runs)
# start from its trunk, the role ImageNet weights play in the release, and get 5 x 30 iterations. The calibration
# (docs/demo_data.md) shows what the encoder's budget decides: from random weights the preset's 10 x 30 iterations
# reach 18.4 mAP on target_val, 2x 30.6, 4x 41.3, and at 1x the target labels themselves give only 21.6, so
# adaptation has nothing to show. The encoder gets 2.5x the preset (25 x 30 iterations, one evaluation at the end),
# what the 20-minute main job has room for since data loading got cheaper.
ENCODER_BUDGET=()
FINETUNE_BUDGET=()
# The clustering baseline that gives SDA its target-domain encoder: the original MMT (--mode mmt) with both
# students starting from the encoder, 2 re-clusterings of the demo's 20 iterations each.
BASELINE_BUDGET=()
if [[ $TINY -eq 0 && "$PRESET" == "demo" ]]; then
    ENCODER_BUDGET=(--epochs 25 --milestones 18 23 --eval-every 25)
    FINETUNE_BUDGET=(--epochs 5 --milestones 3 4 --eval-every 5)
    BASELINE_BUDGET=(--epochs 2)
fi
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
read -r -a EXTRA_BASELINE <<< "${EXTRA_BASELINE_ARGS:-}"
read -r -a EXTRA_SDA <<< "${EXTRA_SDA_ARGS:-}"
read -r -a EXTRA_TRANSLATE <<< "${EXTRA_TRANSLATE_ARGS:-}"
read -r -a EXTRA_PRETRAIN <<< "${EXTRA_PRETRAIN_ARGS:-}"
read -r -a EXTRA_MMT <<< "${EXTRA_MMT_ARGS:-}"
read -r -a EXTRA_CAMERA <<< "${EXTRA_CAMERA_ARGS:-}"
read -r -a EXTRA_POST <<< "${EXTRA_POST_ARGS:-}"

# run_stage NAME OUTPUT_DIR COMMAND...: skip if OUTPUT_DIR/DONE exists, else run COMMAND with its output in
# stage_logs/NAME.log and write the marker atomically on success. The marker records the time, the stage name and
# the command; with RERUN_IF_CHANGED=1 (the cheap evaluation stages) a marker written by a different command does
# not count, so e.g. a new --archs list re-evaluates the ensemble instead of showing the old table.
RERUN_IF_CHANGED=0

# epoch_fraction LOG FIRST_LINE: how far the stage is, in thousandths, from the latest "[... epoch E/N] i/T" progress
# line (pretrain, mmt_plus, camera, sda) from line FIRST_LINE of its log on; nothing if there is none yet.
epoch_fraction() {
    local line
    line="$(tail -n "+$2" "$1" | grep -aoE 'epoch [0-9]+/[0-9]+\] [0-9]+/[0-9]+ ' | tail -n 1)"
    if [[ $line =~ epoch\ ([0-9]+)/([0-9]+)\]\ ([0-9]+)/([0-9]+) ]]; then
        local epoch=${BASH_REMATCH[1]} epochs=${BASH_REMATCH[2]} done=${BASH_REMATCH[3]} iters=${BASH_REMATCH[4]}
        echo $(( ((epoch - 1) * iters + done) * 1000 / (epochs * iters) ))
    fi
}

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
    # The stage runs in the background; every PROGRESS_SECONDS (default 60) the pipeline prints its latest progress
    # line (stages write plain lines with rate and ETA when their output is a file, see reid.progress).
    local log_start waited=0 first_fraction="" first_time=0 fraction left
    log_start=$(wc -l < "$log")  # this run's lines start here (the log keeps those of an interrupted run)
    REID_PROGRESS_SECONDS="${REID_PROGRESS_SECONDS:-20}" "$@" >> "$log" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2> /dev/null; do
        sleep 2
        waited=$((waited + 2))
        if (( waited % ${PROGRESS_SECONDS:-60} == 0 )); then
            # the training stage's time left: its pace since the first epoch progress line seen (so neither the
            # set-up nor the epochs of an interrupted run before a resume count), over the fraction still to do
            fraction="$(epoch_fraction "$log" "$log_start")" left=""
            if [[ -n $fraction && -z $first_fraction ]]; then
                first_fraction=$fraction first_time=$SECONDS
            elif [[ -n $fraction ]] && (( fraction > first_fraction )); then
                left=" (stage: ~$(( (SECONDS - first_time) * (1000 - fraction) / (fraction - first_fraction) )) s left)"
            fi
            echo "[pipeline] $name: $((SECONDS - start)) s$left | $(grep -a '^\[' "$log" | tail -n 1 | cut -c1-150)"
        fi
    done
    wait "$pid" || status=$?
    if [[ $status -ne 0 ]]; then
        echo "[pipeline] $name: FAILED (exit $status) after $((SECONDS - start)) s; last lines of $log:" >&2
        tail -n 25 "$log" >&2
        exit "$status"
    fi
    {
        echo "finished $(date -u '+%Y-%m-%d %H:%M:%S UTC') in $((SECONDS - start)) s"
        echo "stage:$name"
        echo "command:$command_text"
    } > "$out_dir/.DONE.tmp"
    mv "$out_dir/.DONE.tmp" "$out_dir/DONE"
    # --prune-resume-state: a finished training stage keeps its result (model_best.pth), not its resume state
    if [[ $PRUNE_RESUME_STATE -eq 1 && -f "$out_dir/model_best.pth" && -f "$out_dir/checkpoint.pth" ]]; then
        rm -f "$out_dir/checkpoint.pth"
    fi
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
    # data_translator/: the perfect-translator control (the source images rendered by the target cameras; read
    # by the ablation's diagnostics only), where this make_demo_data.py writes one
    if grep -q -e "--translator-out" "$REPO/make_demo_data.py"; then
        DATA_ARGS+=(--translator-out "$WORK/data_translator")
    fi
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
# 1. raw-source pre-training: SDA's source encoder; with the demo preset one per backbone, whose trunk the later
#    pre-trainings of that backbone start from
encoder_dir() { echo "$WORK/encoder-personx-$1"; }
declare -A ENCODER_READY=() # backbones whose encoder stage ran (or was skipped) in this invocation
train_encoder() {
    local arch="$1" name="encoder" dir
    if [[ -n "${ENCODER_READY[$arch]:-}" ]]; then return 0; fi
    ENCODER_READY[$arch]=1
    dir="$(encoder_dir "$arch")"
    if [[ "$arch" != "$SDA_ARCH" ]]; then name="encoder-$arch"; fi
    RERUN_IF_CHANGED=0
    run_stage "$name" "$dir" "$PYTHON" "$REPO/pretrain.py" "${PRESET_ARGS[@]}" --data-root "$DATA" \
        "${DATASET_ARGS[@]}" --source "$SOURCE" --arch "$arch" --seed "${SEED_LIST[0]}" "${WORKER_ARGS[@]}" \
        --logs-dir "$dir" "${ENCODER_BUDGET[@]}" "${TINY_ENCODER[@]}" "${EXTRA_ENCODER[@]}"
}
# pre-training initialisation of backbone $1 with the demo preset: its encoder's trunk and the fine-tuning budget
DEMO_INIT=()
demo_init() {
    DEMO_INIT=()
    if [[ "$PRESET" == "demo" ]]; then
        train_encoder "$1"
        DEMO_INIT=(--pretrained "$(best_checkpoint "$(encoder_dir "$1")")" "${FINETUNE_BUDGET[@]}")
    fi
}
train_encoder "$SDA_ARCH"
ENCODER_CHECKPOINT="$(best_checkpoint "$(encoder_dir "$SDA_ARCH")")"

# ---------------------------------------------------------------------------------------------------------------
# 2. a quick clustering baseline on the target domain from the raw-source pre-training: the target-domain encoder
#    of SDA's relation-consistency term
BASELINE_DIR="$WORK/baseline-mmt-$SDA_ARCH"
run_stage baseline "$BASELINE_DIR" "$PYTHON" "$REPO/mmt_plus.py" "${PRESET_ARGS[@]}" --mode mmt --data-root "$DATA" \
    "${DATASET_ARGS[@]}" --arch "$SDA_ARCH" --init-1 "$ENCODER_CHECKPOINT" --init-2 "$ENCODER_CHECKPOINT" --seed "${SEED_LIST[0]}" \
    "${WORKER_ARGS[@]}" --logs-dir "$BASELINE_DIR" --resume "${BASELINE_BUDGET[@]}" "${TINY_MMT[@]}" \
    "${EXTRA_BASELINE[@]}"
BASELINE_CHECKPOINT="$(best_checkpoint "$BASELINE_DIR")"

# ---------------------------------------------------------------------------------------------------------------
# 3. SDA: train the translator, then write personX_sda/image_train into the work data root
SDA_DIR="$WORK/sda"
SDA_RESUME=()
if [[ -f "$SDA_DIR/checkpoint.pth" || -f "$SDA_DIR/checkpoint.pth" ]]; then SDA_RESUME=(--resume); fi
run_stage sda "$SDA_DIR" "$PYTHON" "$REPO/sda.py" train "${PRESET_ARGS[@]}" --data-root "$DATA" --out "$SDA_DIR" \
    "${DATASET_ARGS[@]}" --source "$SOURCE" \
    --arch "$SDA_ARCH" --source-encoder "$ENCODER_CHECKPOINT" --target-encoder "$BASELINE_CHECKPOINT" \
    --seed "${SEED_LIST[0]}" "${WORKER_ARGS[@]}" "${SDA_RESUME[@]}" "${TINY_SDA[@]}" "${EXTRA_SDA[@]}"
SDA_CHECKPOINT="$SDA_DIR/checkpoint.pth"
if [[ ! -f "$SDA_CHECKPOINT" ]]; then SDA_CHECKPOINT="$SDA_DIR/checkpoint.pth"; fi
run_stage translate "$WORK/translate_done" "$PYTHON" "$REPO/sda.py" translate --checkpoint "$SDA_CHECKPOINT" \
    --data-root "$DATA" "${DATASET_ARGS[@]}" --source "$SOURCE" --out "$DATA" "${WORKER_ARGS[@]}" "${EXTRA_TRANSLATE[@]}"
# the translated source: personX_sda/ of the VisDA layout, else the list dataset WORK/data/<source>_sda/
TRANSLATED_SOURCE=personx_sda
TRANSLATED_ROOT=()
if [[ "$SOURCE" != "personx" ]]; then
    name="$(PYTHONPATH="$REPO" "$PYTHON" -c 'import sys, reid; print(reid.canonical_dataset_name(sys.argv[1]))' "$SOURCE")"
    TRANSLATED_SOURCE=list
    TRANSLATED_ROOT=(--source-root "$DATA/${name}_sda")
fi

# ---------------------------------------------------------------------------------------------------------------
# 4. pre-training on the translated images, two seeds per backbone; 5. MMT+ per backbone
# pretrain_run NAME DIR SOURCE ARCH SEED [FLAGS...]: one pre-training from the backbone's demo initialisation
# (PRETRAIN_ROOT=DIR pretrain_run ...: the source read from DIR instead of the work data root)
pretrain_run() {
    local name="$1" dir="$2" source="$3" arch="$4" seed="$5"
    shift 5
    demo_init "$arch"
    RERUN_IF_CHANGED=0
    run_stage "$name" "$dir" "$PYTHON" "$REPO/pretrain.py" "${PRESET_ARGS[@]}" \
        --data-root "${PRETRAIN_ROOT:-$DATA}" "${DATASET_ARGS[@]}" --source "$source" --arch "$arch" --seed "$seed" \
        "${WORKER_ARGS[@]}" --logs-dir "$dir" "${DEMO_INIT[@]}" "${TINY_PRETRAIN[@]}" "$@" "${EXTRA_PRETRAIN[@]}"
}
sda_pretrain_dir() { echo "$WORK/pretrain-personx_sda-$1-$2"; }
sda_pretraining() {
    pretrain_run "pretrain-$1-$2" "$(sda_pretrain_dir "$1" "$2")" "$TRANSLATED_SOURCE" "$1" "$2" "${TRANSLATED_ROOT[@]}"
}
# mmt_run NAME DIR ARCH SEED INIT_1 INIT_2 [FLAGS...]: MMT+ (with --mode mmt: MMT) at the preset's budget
mmt_run() {
    local name="$1" dir="$2" arch="$3" seed="$4" init_1="$5" init_2="$6"
    shift 6
    RERUN_IF_CHANGED=0
    run_stage "$name" "$dir" "$PYTHON" "$REPO/mmt_plus.py" "${PRESET_ARGS[@]}" --data-root "$DATA" --arch "$arch" \
        "${DATASET_ARGS[@]}" --source "$SOURCE" --init-1 "$init_1" --init-2 "$init_2" --seed "$seed" "${WORKER_ARGS[@]}" --logs-dir "$dir" --resume \
        "$@" "${TINY_MMT[@]}" "${EXTRA_MMT[@]}"
}
# MMT+ of backbone $1 with training seed $2, always from the SDA pre-trainings of --seeds (the pipeline's: seed 1)
mmt_plus_dir() {
    if [[ "$2" == "${SEED_LIST[0]}" ]]; then echo "$WORK/mmt-$1"; else echo "$WORK/mmt-$1-seed$2"; fi
}
mmt_plus_run() {
    local arch="$1" seed="$2" name="mmt-$1"
    if [[ "$seed" != "${SEED_LIST[0]}" ]]; then name="mmt-$arch-seed$seed"; fi
    sda_pretraining "$arch" "${SEED_LIST[0]}"
    sda_pretraining "$arch" "${SEED_LIST[1]}"
    mmt_run "$name" "$(mmt_plus_dir "$arch" "$seed")" "$arch" "$seed" \
        "$(best_checkpoint "$(sda_pretrain_dir "$arch" "${SEED_LIST[0]}")")" \
        "$(best_checkpoint "$(sda_pretrain_dir "$arch" "${SEED_LIST[1]}")")"
}
MMT_CHECKPOINTS=()
for arch in "${ARCH_LIST[@]}"; do
    mmt_plus_run "$arch" "${SEED_LIST[0]}"
    MMT_CHECKPOINTS+=("$(best_checkpoint "$(mmt_plus_dir "$arch" "${SEED_LIST[0]}")")")
done

# ---------------------------------------------------------------------------------------------------------------
# 6. camera classifier (slides: ResNeSt-50; the demo preset uses a small backbone)
CAMERA_DIR="$WORK/camera"
RERUN_IF_CHANGED=0
run_stage camera "$CAMERA_DIR" "$PYTHON" "$REPO/camera.py" "${PRESET_ARGS[@]}" --data-root "$DATA" \
    "${DATASET_ARGS[@]}" --logs-dir "$CAMERA_DIR" --seed "${SEED_LIST[0]}" "${WORKER_ARGS[@]}" --resume \
    "${TINY_CAMERA[@]}" "${EXTRA_CAMERA[@]}"

# ---------------------------------------------------------------------------------------------------------------
# 7. post-processing: evaluation + ablation on target_val, challenge submission on target_test
CAMERA_CHECKPOINT="$(best_checkpoint "$CAMERA_DIR")"
POST_ARGS=(--checkpoints "${MMT_CHECKPOINTS[@]}" --camera-checkpoint "$CAMERA_CHECKPOINT"
           --data-root "$DATA" "${WORKER_ARGS[@]}")
RERUN_IF_CHANGED=1 # post-processing reads cached features: cheap to redo when the inputs changed
run_stage post-val "$WORK/post-val" "$PYTHON" "$REPO/postprocess.py" "${POST_ARGS[@]}" "${DATASET_ARGS[@]}" \
    --out "$WORK/post-val" --ablation "${METRIC_ARGS[@]}" "${EXTRA_POST[@]}"
if [[ $TEST_SUBMISSION -eq 1 ]]; then
    run_stage post-test "$WORK/post-test" "$PYTHON" "$REPO/postprocess.py" "${POST_ARGS[@]}" --dataset target_test \
        --out "$WORK/post-test" --num-figures 4 "${EXTRA_POST[@]}"
fi

# ---------------------------------------------------------------------------------------------------------------
# 8. ablation (--ablation): the seed's Tables 2-4 as paired comparisons. Every compared pair starts from the same
#    initialisation with the same budget; every row holds one run per ablation seed; every model is evaluated with
#    each post-processing step off/on (postprocess.py --ablation, one metric, shared feature cache), and
#    ablation_report.py turns the evaluations into rows (mean +- spread) in WORK/ablation/ablation.{md,json}.
if [[ $ABLATION -eq 1 ]]; then
    ABLATION_DIR="$WORK/ablation"
    mkdir -p "$ABLATION_DIR"
    arch="${ARCH_LIST[0]}"
    SECOND_ARCH="$ENSEMBLE_ARCH" # the ensemble rows need two different backbones
    if [[ ${#ARCH_LIST[@]} -gt 1 ]]; then SECOND_ARCH="${ARCH_LIST[1]}"; fi
    if [[ "$SECOND_ARCH" == "$arch" ]]; then
        echo "run_pipeline.sh: the ablation's ensemble needs two different backbones (--ensemble-arch)" >&2
        exit 2
    fi
    SDA_INIT_1="$(best_checkpoint "$(sda_pretrain_dir "$arch" "${SEED_LIST[0]}")")"
    SDA_INIT_2="$(best_checkpoint "$(sda_pretrain_dir "$arch" "${SEED_LIST[1]}")")"
    REPORT_ARGS=()
    # evaluate ROW SEED CHECKPOINT...: the model(s) with the camera term and re-ranking each off/on
    # (postprocess.py --ablation), one metric, features shared through one cache
    evaluate() {
        local model="$1" seed="$2" out="$ABLATION_DIR/eval-$1-$2"
        shift 2
        RERUN_IF_CHANGED=1
        run_stage "eval-$model-$seed" "$out" "$PYTHON" "$REPO/postprocess.py" --checkpoints "$@" \
            --camera-checkpoint "$CAMERA_CHECKPOINT" --data-root "$DATA" --dataset target_val --ablation \
            --out "$out" --cache-dir "$ABLATION_DIR/feature_cache" --num-figures 0 "${METRIC_ARGS[@]}" \
            "${WORKER_ARGS[@]}" "${EXTRA_POST[@]}"
        REPORT_ARGS+=(--eval "$model" "$seed" "$out")
    }
    # ablation_seed SEED "GROUPS": the runs of one seed for the groups named (pretrain, mmt, ensemble, diagnostics)
    ablation_seed() {
        local seed="$1" groups=" $2 " dir first second
        if [[ "$groups" == *" pretrain "* ]]; then
            # Table 2: pre-training on raw vs SDA-translated images, same initialisation, budget and seed
            dir="$WORK/pretrain-personx-$arch-$seed"
            pretrain_run "pretrain-raw-$arch-$seed" "$dir" personx "$arch" "$seed"
            evaluate raw_pretrain "$seed" "$(best_checkpoint "$dir")"
            sda_pretraining "$arch" "$seed"
            evaluate sda_pretrain "$seed" "$(best_checkpoint "$(sda_pretrain_dir "$arch" "$seed")")"
        fi
        if [[ "$groups" == *" mmt "* || "$groups" == *" ensemble "* ]]; then
            # Table 3 and the post-processing steps: MMT+ from the pipeline's two SDA pre-trainings, seed $seed
            mmt_plus_run "$arch" "$seed"
            first="$(best_checkpoint "$(mmt_plus_dir "$arch" "$seed")")"
            evaluate mmt_plus "$seed" "$first"
        fi
        if [[ "$groups" == *" mmt "* ]]; then
            # the original MMT from the same two initialisations with the same budget and seed
            dir="$WORK/mmt-original-$arch-seed$seed"
            mmt_run "mmt-original-$arch-seed$seed" "$dir" "$arch" "$seed" "$SDA_INIT_1" "$SDA_INIT_2" --mode mmt
            evaluate mmt "$seed" "$(best_checkpoint "$dir")"
        fi
        if [[ "$groups" == *" ensemble "* ]]; then
            # Table 4: the second backbone through the same stages with the same budgets, and the ensemble of both
            mmt_plus_run "$SECOND_ARCH" "$seed"
            second="$(best_checkpoint "$(mmt_plus_dir "$SECOND_ARCH" "$seed")")"
            evaluate "mmt_plus_$SECOND_ARCH" "$seed" "$second"
            evaluate ensemble "$seed" "$first" "$second"
        fi
        # DIAGNOSTICS ONLY (they read the benchmark's ground truth; never a method's input): MMT+ with the true
        # identities as pseudo labels (what self-training reaches at this budget with perfect clusters) and the
        # same pre-training on the labelled target training set (what the target data itself teaches)
        if [[ "$groups" == *" diagnostics "* && -z "$DATA_ROOT" ]]; then
            dir="$WORK/mmt-oracle-$arch-seed$seed"
            mmt_run "mmt-oracle-$arch-seed$seed" "$dir" "$arch" "$seed" "$SDA_INIT_1" "$SDA_INIT_2" \
                --oracle-pseudo-labels
            evaluate mmt_plus_oracle "$seed" "$(best_checkpoint "$dir")"
            dir="$WORK/pretrain-target-labels-$arch-$seed"
            pretrain_run "pretrain-target-labels-$arch-$seed" "$dir" personx "$arch" "$seed" \
                --target-labels-upper-bound
            evaluate target_label_bound "$seed" "$(best_checkpoint "$dir")"
            # the same pre-training on what a perfect translator would produce (same identities, poses and file
            # names, rendered by the target cameras): the ceiling of the SDA row
            if [[ -d "$WORK/data_translator/personX" ]]; then
                dir="$WORK/pretrain-perfect-translator-$arch-$seed"
                PRETRAIN_ROOT="$WORK/data_translator" pretrain_run "pretrain-perfect-translator-$arch-$seed" "$dir" \
                    personx "$arch" "$seed" --target-root "$DATA"
                evaluate perfect_translator "$seed" "$(best_checkpoint "$dir")"
            else
                echo "[pipeline] no $WORK/data_translator (data generated without --translator-out):" \
                    "the perfect-translator control is left out"
            fi
        fi
    }
    BENCHMARK="synthetic benchmark"
    if [[ -n "$DATA_ROOT" ]]; then BENCHMARK="data $DATA_ROOT"; fi
    write_report() {
        "$PYTHON" "$REPO/ablation_report.py" --work "$WORK" --benchmark "$BENCHMARK" "${REPORT_ARGS[@]}"
    }

    if [[ "$PRESET" == "demo" ]]; then evaluate encoder "${SEED_LIST[0]}" "$ENCODER_CHECKPOINT"; fi
    for seed in "${ABLATION_SEED_LIST[@]}"; do ablation_seed "$seed" "pretrain mmt ensemble diagnostics"; done
    write_report > /dev/null
    # where a claim's spread exceeds its effect, its rows get a third seed (unless --ablation-seeds was given)
    if [[ -z "$ABLATION_SEEDS" ]]; then
        GROUPS_TO_REPEAT="$("$PYTHON" "$REPO/ablation_report.py" --inconclusive-groups "$ABLATION_DIR/ablation.json")"
        if [[ -n "$GROUPS_TO_REPEAT" ]]; then
            third=$(( $(printf '%s\n' "${ABLATION_SEED_LIST[@]}" | sort -n | tail -n 1) + 1 ))
            echo "[pipeline] ablation: spread > effect for '$GROUPS_TO_REPEAT': a third seed ($third) for their rows"
            ablation_seed "$third" "$GROUPS_TO_REPEAT"
        fi
    fi
    write_report
fi

echo
if [[ -z "$DATA_ROOT" && ${#ROOT_ARGS[@]} -lt 6 ]]; then echo "(embedded synthetic benchmark: these are synthetic-benchmark results)"; fi
cat "$WORK/post-val/results.md"
echo
echo "[pipeline] all stages done in $WORK"
if [[ $TEST_SUBMISSION -eq 1 ]]; then echo "[pipeline] challenge submission: $WORK/post-test/result.zip"; fi
