#!/bin/bash
# usage: queue.sh "ds:seed:probe" ...  probe in {S, D}; sequential, skips finished ones. Offline 50k + rest 5k.
cd /work/scratch-rest
for spec in "$@"; do
  IFS=: read ds seed probe <<< "$spec"
  tag=$ds-s$seed-$probe; out=/work/probes/rest2/$tag
  [ -f $out.done ] && continue
  rm -rf $out
  if [ $probe = S ]; then export SMAC_LR_COSINE=1 SMAC_SCORE_IDQL=0; else export SMAC_LR_COSINE=0 SMAC_SCORE_IDQL=1; fi
  OMP_NUM_THREADS=1 /work/venv/bin/python smac.py --env $ds-medium-replay-v2 \
    --dataset-path ../shared/datasets/${ds}_medium_replay-local.hdf5 --seed $seed --total-updates 50000 \
    --eval-freq-updates 1000 --eval-episodes 5 --score-model-updates 10000 --exp-name probe-$probe \
    --run-dir $out > $out.log 2>&1 || continue
  ck=$(ls $out/*/smac.pt)
  OMP_NUM_THREADS=1 /work/venv/bin/python tools/offline_rest.py $ck --updates 5000 --eval-freq 500 --eval-episodes 5 \
    --seed $seed --out /work/probes/rest2/rest-$tag.csv > /work/probes/rest2/rest-$tag.log 2>&1 && touch $out.done
done
