#!/usr/bin/env bash
# One SLURM array task per slide: every task segments one slide of a folder, on one node.
#
#   bash workflows/slurm_array.sh SLIDES_DIR OUT_DIR [segment options]   # freezes the list, prints the sbatch line
#   sbatch --array=0-N workflows/slurm_array.sh LIST_OR_DIR OUT_DIR [segment options]
#
# Task k segments line k of a slide list, so every task of one array sees the same slides: a slide
# copied into the folder while the array waits in the queue cannot shift the indices.
# - Run without sbatch, the script writes the list (OUT_DIR/slurm-array/slides-<time>.txt, one path
#   per line) and prints the sbatch line that uses it.
# - Submitted with a folder, the first task to start writes OUT_DIR/slurm-array/job-<array id>.txt
#   and every task of that array reads it; slides added later wait for the next submission.
# Re-submitting resumes: finished slides are skipped and an interrupted slide (walltime,
# preemption) continues from its finished chunks (--resume). Each slide's OUT_DIR/<slide>/summary.json
# is its record; OUT_DIR/run.json is rewritten by each task.
# Edit the #SBATCH lines for your site (partition, account, GPUs).
#SBATCH --job-name=wsi-nuclei
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%A_%a.out
##SBATCH --partition=gpu
##SBATCH --gres=gpu:1
set -euo pipefail

if [ "$#" -lt 2 ]; then
    echo "usage: sbatch --array=0-N $0 SLIDES_DIR_OR_LIST OUT_DIR [wsi-nuclei segment options]" >&2
    exit 2
fi
SOURCE=$1
OUT_DIR=$2
shift 2
WSI_NUCLEI=${WSI_NUCLEI:-wsi-nuclei}
export HF_HUB_OFFLINE=1
LISTS="$OUT_DIR/slurm-array"

# the slides of a folder, in a fixed order (same extensions as `wsi-nuclei segment FOLDER`), one per line
list_folder() {
    find -L "$1" -type f \( -iname '*.svs' -o -iname '*.tif' -o -iname '*.tiff' -o -iname '*.ndpi' \
        -o -iname '*.vms' -o -iname '*.vmu' -o -iname '*.scn' -o -iname '*.mrxs' -o -iname '*.svslide' -o -iname '*.bif' \
        -o -iname '*.dcm' -o -iname '*.czi' \) -not -path '*/.partial/*' -print0 | LC_ALL=C sort -z |
        while IFS= read -r -d '' f; do
            case "$f" in
                *$'\n'*) echo "error: '$f' has a line break in its name; rename it" >&2; exit 3 ;;
            esac
            printf '%s\n' "$f"
        done
}

# write the list of folder $1 to file $2 without ever replacing an existing one: the first writer wins
freeze() {
    mkdir -p "$LISTS"
    local tmp="$2.$$.$RANDOM.tmp"
    list_folder "$1" > "$tmp"
    ln "$tmp" "$2" 2>/dev/null || true  # link(2) is atomic, also on NFS: a second task keeps the first list
    rm -f "$tmp"
    [ -s "$2" ] || { echo "error: $1 holds no slides" >&2; exit 2; }
}

if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
    if [ ! -d "$SOURCE" ]; then
        echo "error: $SOURCE is not a folder; give the folder of slides to list" >&2
        exit 2
    fi
    LIST="$LISTS/slides-$(date +%Y%m%d-%H%M%S)-$$.txt"
    freeze "$SOURCE" "$LIST"
    N=$(wc -l < "$LIST")
    echo "$N slides, listed in $LIST; submit with:"
    echo "  sbatch --array=0-$(( N - 1 )) $0 $LIST $OUT_DIR $*"
    exit 0
fi
if [ -d "$SOURCE" ]; then
    LIST="$LISTS/job-${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local}}.txt"
    [ -f "$LIST" ] || freeze "$SOURCE" "$LIST"
elif [ -f "$SOURCE" ]; then
    LIST=$SOURCE
else
    echo "error: $SOURCE is neither a folder of slides nor a slide list" >&2
    exit 2
fi
mapfile -t SLIDES < "$LIST"
if [ "${#SLIDES[@]}" -eq 0 ]; then
    echo "error: $LIST lists no slides" >&2
    exit 2
fi
if [ "$SLURM_ARRAY_TASK_ID" -ge "${#SLIDES[@]}" ]; then
    echo "array task $SLURM_ARRAY_TASK_ID: $LIST lists only ${#SLIDES[@]} slides" >&2
    exit 0
fi
if [ "${SLURM_ARRAY_TASK_MAX:-}" = "$SLURM_ARRAY_TASK_ID" ] && [ "${#SLIDES[@]}" -gt $(( SLURM_ARRAY_TASK_ID + 1 )) ]; then
    echo "warning: $LIST lists ${#SLIDES[@]} slides but this array ends at task $SLURM_ARRAY_TASK_ID;" \
        "submit --array=$(( SLURM_ARRAY_TASK_ID + 1 ))-$(( ${#SLIDES[@]} - 1 )) with the same list for the rest" >&2
fi
SLIDE=${SLIDES[$SLURM_ARRAY_TASK_ID]}
echo "array task $SLURM_ARRAY_TASK_ID: $SLIDE (from $LIST)"
# chunks run in this job's process (no extra Dask processes), on its GPU if it has one
exec "$WSI_NUCLEI" segment "$SLIDE" -o "$OUT_DIR" --resume --workers 0 --threads "${SLURM_CPUS_PER_TASK:-2}" --quiet "$@"
