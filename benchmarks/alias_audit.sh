#!/usr/bin/env bash
# The alias audit of docs/alias-audit.md, from a finished `fvar experiment ablation` folder:
#   benchmarks/alias_audit.sh ABLATION_DIR AUDIT_DIR
# 1. the row fvar-focus-grad (seed 0) in the same folder: the full FVAR with a tokenizer trained
#    exactly as the ablation's but with gradients through the blurred views' encodes
#    (tokenizer_train.focus_grad=true, the default of the paper presets);
# 2. `fvar experiment alias-audit` of each seed-0 tokenizer on 1,000 Fashion-MNIST test images (with
#    the pyramid noise of Eq. 3 as trained, and without it) and on 512 32-px crops of scikit-image's
#    photographs (benchmarks/skimage_photos.py);
# 3. the teacher/student CE (true and shuffled alias tokens) of every distilled cell is in
#    ABLATION_DIR/cells/*/seed-*/result.json already (teacher_ce, teacher_shuffled_ce, student_ce).
set -euo pipefail
abl=${1:?ablation folder}; out=${2:?audit folder}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
[ -d "$out/photos" ] || python "$here/skimage_photos.py" "$out/photos"
fvar experiment ablation --out "$abl" --rows fvar-focus-grad --seeds 1
for tok in area disk gaussian shared disk-focus-grad; do
  ck="$abl/tokenizers/$tok/seed-0/run"
  fvar experiment alias-audit --tokenizer "$ck" --data "$abl/data/test" --max-images 1000 \
    --json "$out/$tok-fashion-mnist.json" | tee "$out/$tok-fashion-mnist.txt"
  fvar experiment alias-audit --tokenizer "$ck" --data "$abl/data/test" --max-images 1000 --set pyramid.noise=false \
    --json "$out/$tok-fashion-mnist-no-noise.json" | tee "$out/$tok-fashion-mnist-no-noise.txt"
  fvar experiment alias-audit --tokenizer "$ck" --data "$out/photos" --max-images 512 \
    --json "$out/$tok-photos.json" | tee "$out/$tok-photos.txt"
done
# The alias residual's (absolute) energy during tokenizer training, as the runs logged it.
for tok in disk disk-focus-grad; do
  python - "$abl/tokenizers/$tok/seed-0/run/metrics.jsonl" <<'PY' | tee "$out/$tok-training.txt"
import json, sys
print(sys.argv[1])
for line in open(sys.argv[1]):
    m = json.loads(line)
    if "alias_energy" in m:
        print(f"step {m['step']:>4}  alias_energy {m['alias_energy']:.3e}  vq {m['vq']:.4f}  psnr {m['psnr']:.2f}")
PY
done
