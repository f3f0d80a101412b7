#!/usr/bin/env bash
# Build llama.cpp (llama-cpp-python 0.3.36, from source) for one instruction set, into a folder of its
# own, so that `qwenvl bench --compare llama.cpp --llama-cpp DIR` compares kernels of the same ISA.
#
#   benchmarks/build_llama_cpp.sh avx2    [DEST]   # AVX2 + FMA + F16C, no AVX-512 (a Zen 1-3 / client Intel CPU)
#   benchmarks/build_llama_cpp.sh avx512  [DEST]   # AVX-512 (+ BF16 / VNNI where the compiler and CPU have them)
#   benchmarks/build_llama_cpp.sh native  [DEST]   # -march=native, as pip builds it by default
#
# DEST defaults to ${QWENVL_CACHE:-~/.cache/qwenvl}/peers/llama-cpp-ISA. The build takes ~10 minutes
# on 2 cores. AMX is left out of every build: its extra buffer type crashes on Sapphire Rapids here.
set -euo pipefail
isa=${1:?usage: build_llama_cpp.sh avx2|avx512|native [DEST]}
dest=${2:-${QWENVL_CACHE:-$HOME/.cache/qwenvl}/peers/llama-cpp-$isa}
python=${PYTHON:-python3}
common="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF"
case "$isa" in
  avx2) flags="$common -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF" ;;
  avx512) flags="$common -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" ;;
  native) flags="-DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF" ;;
  *) echo "build_llama_cpp.sh: unknown ISA '$isa' (avx2, avx512 or native)" >&2; exit 2 ;;
esac
mkdir -p "$(dirname "$dest")"
tmp=$(mktemp -d "$dest.partial-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "building llama-cpp-python 0.3.36 for $isa into $dest (about 10 minutes)" >&2
CMAKE_ARGS="$flags" "$python" -m pip install --quiet --no-cache-dir --no-deps --no-binary llama-cpp-python \
  --target "$tmp" "llama-cpp-python==0.3.36" diskcache
echo "$isa: $flags" > "$tmp/QWENVL_BUILD"
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
echo "$dest"
