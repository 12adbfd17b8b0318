#!/usr/bin/env bash
# One SLURM array task per slide: every task segments one slide of a folder, on one node.
#
#   bash workflows/slurm_array.sh SLIDES_DIR OUT_DIR [segment options]   # prints the sbatch line
#   sbatch --array=0-N workflows/slurm_array.sh SLIDES_DIR OUT_DIR [segment options]
#
# Re-submitting the same array resumes: finished slides are skipped and an interrupted slide
# (walltime, preemption) continues from its finished chunks (--resume). Each slide's
# OUT_DIR/<slide>/summary.json is its record; OUT_DIR/run.json is rewritten by each task.
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
    echo "usage: sbatch --array=0-N $0 SLIDES_DIR OUT_DIR [wsi-nuclei segment options]" >&2
    exit 2
fi
SLIDES_DIR=$1
OUT_DIR=$2
shift 2
WSI_NUCLEI=${WSI_NUCLEI:-wsi-nuclei}
export HF_HUB_OFFLINE=1

# the slides, in a fixed order (same extensions as `wsi-nuclei segment FOLDER`)
mapfile -t SLIDES < <(find "$SLIDES_DIR" -type f \( -iname '*.svs' -o -iname '*.tif' -o -iname '*.tiff' -o -iname '*.ndpi' \
    -o -iname '*.vms' -o -iname '*.vmu' -o -iname '*.scn' -o -iname '*.mrxs' -o -iname '*.svslide' -o -iname '*.bif' \
    -o -iname '*.dcm' -o -iname '*.czi' \) -not -path '*/.partial/*' | LC_ALL=C sort)
if [ "${#SLIDES[@]}" -eq 0 ]; then
    echo "error: $SLIDES_DIR holds no slides" >&2
    exit 2
fi
if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
    echo "${#SLIDES[@]} slides; submit with:"
    echo "  sbatch --array=0-$(( ${#SLIDES[@]} - 1 )) $0 $SLIDES_DIR $OUT_DIR $*"
    exit 0
fi
if [ "$SLURM_ARRAY_TASK_ID" -ge "${#SLIDES[@]}" ]; then
    echo "array task $SLURM_ARRAY_TASK_ID: only ${#SLIDES[@]} slides" >&2
    exit 0
fi
SLIDE=${SLIDES[$SLURM_ARRAY_TASK_ID]}
echo "array task $SLURM_ARRAY_TASK_ID: $SLIDE"
# chunks run in this job's process (no extra Dask processes), on its GPU if it has one
exec "$WSI_NUCLEI" segment "$SLIDE" -o "$OUT_DIR" --resume --workers 0 --threads "${SLURM_CPUS_PER_TASK:-2}" --quiet "$@"
