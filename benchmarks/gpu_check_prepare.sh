#!/usr/bin/env bash
# Prepares, in this checkout's root, what `python -m benchmarks.gpu_check` needs on the device machine,
# which has Python 3.12 with torch but reaches no package registry (benchmarks/gpu_check.py says how
# to run it). Two carries, each under the device tool's 64 MiB per call:
#   .gpu_whl1/  SimpleITK alone (about 50 MiB)
#   .gpu_whl2/  every other wheel of benchmarks/gpu_check_wheels.txt (about 55 MiB)
#   .gpu_data/  the shared CT and slide the benchmarks read (about 2.5 MiB)
# .gitignore ignores them (and .gpu_site/, where the device installs the wheels), so they travel
# only when a call carries them.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=(${PYTHON:-python3} -m pip)
DATA=${GCMLM_TEST_DATA:-../shared/data}
rm -rf .gpu_whl1 .gpu_whl2 .gpu_data
mkdir -p .gpu_whl1 .gpu_whl2 .gpu_data
mkdir -p .gpu_data/ct/totalsegmentator .gpu_data/wsi
cp "$DATA"/ct/totalsegmentator/example_ct_sm.nii.gz "$DATA"/ct/totalsegmentator/example_ct_sm_stomach.nii.gz \
  .gpu_data/ct/totalsegmentator/
cp "$DATA"/wsi/cmu-1-small-region.svs .gpu_data/wsi/
download=(download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
grep -v '^#' benchmarks/gpu_check_wheels.txt | grep -i '^simpleitk==' > .gpu_whl1/requirements.txt
# acvl_utils has no wheel on PyPI: it is pure Python, so a wheel built here serves Python 3.12 too.
grep -v '^#' benchmarks/gpu_check_wheels.txt | grep -vi '^simpleitk==' | grep -vi '^acvl_utils==' \
  > .gpu_whl2/requirements.txt
"${PIP[@]}" "${download[@]}" -d .gpu_whl1 -r .gpu_whl1/requirements.txt
"${PIP[@]}" "${download[@]}" -d .gpu_whl2 -r .gpu_whl2/requirements.txt
"${PIP[@]}" wheel -q --no-deps -w .gpu_whl2 "$(grep -i '^acvl_utils==' benchmarks/gpu_check_wheels.txt)"
du -sh .gpu_whl1 .gpu_whl2 .gpu_data
