#!/usr/bin/env bash
# The alias audit of docs/alias-audit.md, from a finished `fvar experiment ablation` folder:
#   benchmarks/alias_audit.sh ABLATION_DIR AUDIT_DIR
# 1. a seed-0 disk tokenizer trained exactly as the ablation's, but with gradients through the
#    blurred views' encodes (tokenizer_train.focus_grad=true, the pre-fmnist default);
# 2. `fvar experiment alias-audit` of each seed-0 tokenizer on 1,000 Fashion-MNIST test images and
#    on 512 32-px crops of scikit-image's photographs (benchmarks/skimage_photos.py);
# 3. the teacher/student CE (true and shuffled alias tokens) of every distilled cell is in
#    ABLATION_DIR/cells/*/seed-*/result.json already (teacher_ce, teacher_shuffled_ce, student_ce).
set -euo pipefail
abl=${1:?ablation folder}; out=${2:?audit folder}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
[ -d "$out/photos" ] || python "$here/skimage_photos.py" "$out/photos"
# The ablation's tokenizer settings (fvar_core/experiment.py: BUDGETS["cpu"], seed 0).
fvar train-tokenizer --preset fmnist-32 --data "$abl/data/train" --out "$out/tokenizer-focus-grad" \
  --set tokenizer_train.steps=350 --set tokenizer_train.ckpt_every=350 --set tokenizer_train.sample_every=0 \
  --set tokenizer_train.seed=0 --set train.steps=250 --set train.ckpt_every=250 --set train.sample_every=0 \
  --set train.seed=0 --set tokenizer_train.focus_grad=true
for tok in area disk gaussian shared focus-grad; do
  if [ "$tok" = focus-grad ]; then ck="$out/tokenizer-focus-grad"; else ck="$abl/tokenizers/$tok/seed-0/run"; fi
  fvar experiment alias-audit --tokenizer "$ck" --data "$abl/data/test" --max-images 1000 \
    --json "$out/$tok-fashion-mnist.json" | tee "$out/$tok-fashion-mnist.txt"
  fvar experiment alias-audit --tokenizer "$ck" --data "$out/photos" --max-images 512 \
    --json "$out/$tok-photos.json" | tee "$out/$tok-photos.txt"
done
