#!/usr/bin/env bash
# Train the next base-model candidates on a lent GPU machine, all four at once, within MINUTES each.
#
# Run there through the device tool, after `python bench/device/pack.py` here:
#   run(command="bash bench/device/train_on_device.sh 7", carry=[".device-pack"], timeout_s=600)
# What comes back under $OUT (one archive per run: the model package, its train_log.csv,
# validation.json and the command's output; no checkpoints), to unpack here with
#   for f in FILES_AT/*.tgz; do tar xzf "$f" -C out/; done
#   thigh.tgz      thigh candidate: shipped thigh model trained on (Docs/training.md, GPU rule)
#   leg.tgz        calf version 3 recipe from random weights (Docs/training.md, GPU rule)
#   loao-t1.tgz    leave-one-anatomy-out: the recipe without the T1 slice's anatomy, scored on it
#   loao-pd.tgz    the same for the PD slice
#   device.txt     the GPU, the software and how long each run took
#   gpu_use.txt    nvidia-smi dmon every 10 s during the runs (GPU use and memory)
# The commands are those of the committed rules with --time-limit MINUTES (at most 20,000 steps);
# each manifest records the steps it reached. DAFNE_DEVICE=cpu runs the same script here as a smoke test.
set -uo pipefail
minutes=${1:-7}
device=${DAFNE_DEVICE:-cuda}
pack=.device-pack
out=$(realpath -m "${OUT:-/tmp/dafne-device-out}")
work=/tmp/dafne-device-work
rm -rf "$work"  # a warm machine keeps /tmp: never pack an earlier call's results
mkdir -p "$out" "$work" /tmp/dafne-pkg
# Each run is killed a minute after its limit, so that the archives below are always written.
kill_after=$(python3 -c "import sys; print(int(float(sys.argv[1]) * 60) + 60)" "$minutes")
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dafne-site \
    "$pack"/wheels/*.whl || { echo "installing the carried wheels failed" >&2; exit 1; }
ln -sfn "$PWD/Logic" /tmp/dafne-pkg/dafne_logic  # the package without installing it
export PYTHONPATH=/tmp/dafne-pkg:/tmp/dafne-site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
data=$pack/data
schedule=(--steps 20000 --batch-size 32 --device "$device" --checkpoint-every 1000 --val-every 1000 --no-progress
          --time-limit "$minutes")

archive() {  # NAME: its model, log and training log into $OUT/NAME.tgz (tar skips what a failed run lacks)
  local name=$1
  case $name in
    loao-*) local slice=${name#loao-}
            (cd "$work" && tar czf "$out/$name.tgz" "$name.log" "$name-results" "$name-work/leg-without-${slice}_example" \
                 "$name-work/leg-without-${slice}_example.training/train_log.csv") ;;
    *) (cd "$work" && tar czf "$out/$name.tgz" "$name" "$name.log" "$name.training/train_log.csv" \
            "$name.training/validation.json") ;;
  esac
}

timed() {  # NAME COMMAND...: run in the background, output and duration in $work/NAME.log; archived
  # into $OUT as soon as it ends, so a command cut short by the device's limit still returns the runs done
  local name=$1; shift
  ( start=$SECONDS; timeout -k 10 "$kill_after" "$@" > "$work/$name.log" 2>&1; status=$?
    echo "exit status $status after $((SECONDS - start)) s" >> "$work/$name.log"; archive "$name" ) &
  runs+=($!)
}
runs=()
{ date -u; python3 --version; python3 -c "import torch, monai, SimpleITK; print('torch', torch.__version__,
  'monai', monai.__version__, 'SimpleITK', SimpleITK.Version_VersionString(), 'cuda', torch.cuda.is_available())";
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null; } > "$out/device.txt" 2>&1
timed thigh python3 -m dafne_logic.cli train --region thigh --label-maps "$data/thigh_label_maps" \
    "$data/lowerbody_label_maps" "$data/visible_human_label_maps" --phantoms 16 --phantom-share 0.3 \
    --holdout-subjects THIGH_003 THIGH_026 THIGH_034 THIGH_114 HV003_3 --output "$work/thigh" --name thigh \
    --init Logic/bundled_models/thigh --lr 0.0015 "${schedule[@]}"
timed leg python3 -m dafne_logic.cli train --region leg --label-maps "$data/calf_slices/t1_example_labels.nii.gz" \
    "$data/calf_slices/pd_example_labels.nii.gz" "$data/lowerbody_label_maps/test_dseg_a.nii.gz" \
    "$data/visible_human_label_maps" --source-weights VHM_legs=0.6 VHF_legs=0.6 --phantoms 9 --phantom-share 0.2 \
    --holdout-subjects phantom_1008 --output "$work/leg" --name leg --lr 0.002 "${schedule[@]}"
for slice in t1 pd; do
    timed "loao-$slice" python3 bench/leave_one_anatomy_out.py --data "$data" --slices "${slice}_example" \
        --steps 20000 --batch-size 32 --device "$device" --phantom-share 0.2 --time-limit "$minutes" \
        --tag "leg-v3-gpu-$slice" --results "$work/loao-$slice-results" --work-dir "$work/loao-$slice-work"
done
# GPU use every 10 s while the runs share it (did four runs at once keep it busy?), written as it goes.
monitor=""
if command -v nvidia-smi > /dev/null; then nvidia-smi dmon -s um -d 10 > "$out/gpu_use.txt" 2>&1 & monitor=$!; fi
wait "${runs[@]}"
[ -n "$monitor" ] && kill "$monitor" 2> /dev/null
tail -n 1 "$work"/*.log >> "$out/device.txt" 2>&1
cd "$work" || exit 1
grep -q "exit status 0" thigh.log && grep -q "exit status 0" leg.log \
    && grep -q "exit status 0" loao-t1.log && grep -q "exit status 0" loao-pd.log
