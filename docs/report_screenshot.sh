#!/usr/bin/env bash
# Makes docs/img/report.png and docs/img/density.png: a small batch (the bundled slide, a crop of
# it, and three files of ../shared/data/wsi that fail for three reasons), its report.html in
# headless Chromium (Debian's chromium), and the bundled slide's density.png.
#   bash docs/report_screenshot.sh [WORK_DIR]        (from the repository root; ~1 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d)}
WSI=../shared/data/wsi
mkdir -p "$WORK/in"
.venv/bin/python -c "from tests.slides import cmu_crop_slide; cmu_crop_slide('$WORK/in/CMU-1-top-half.tif', (0, 0, 2220, 1480))"
.venv/bin/wsi-nuclei segment wsi_nuclei/data/CMU-1-Small-Region.svs "$WORK/in/CMU-1-top-half.tif" \
    "$WSI/tcga-cr-7395-01a-01-ts1.svs" "$WSI/openslide-python-fixtures/unopenable.tiff" "$WSI/openslide-python-fixtures/boxes.tiff" \
    -o "$WORK/out" --overwrite --quiet || true  # three slides fail: that is the point
sandbox=""
[ "$(id -u)" = 0 ] && sandbox="--no-sandbox"
chromium --headless $sandbox --disable-gpu --hide-scrollbars --window-size=1280,1000 \
    --screenshot="$PWD/docs/img/report.png" "file://$WORK/out/report.html" 2>/dev/null
cp "$WORK/out/CMU-1-Small-Region/density.png" docs/img/density.png
echo "docs/img/report.png, docs/img/density.png (batch in $WORK/out)"
