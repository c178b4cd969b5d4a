#!/usr/bin/env bash
# Build the C++ client against the libtorch inside the torch wheel (headers in torch/include, libraries in
# torch/lib): no separate libtorch download. Usage: PYTHON=path/to/python examples/cpp/build.sh [OUT]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
torch_dir="$("${PYTHON:-python}" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
abi="$("${PYTHON:-python}" -c 'import torch; print(int(torch.compiled_with_cxx11_abi()))')"
out="${1:-$here/build/sample}"
mkdir -p "$(dirname "$out")"
# -O1: the client's own loops are trivial next to the graphs; higher levels only lengthen the compile.
g++ -std=c++17 -O1 -D_GLIBCXX_USE_CXX11_ABI="$abi" "$here/sample.cpp" -o "$out" \
    -isystem "$torch_dir/include" -isystem "$torch_dir/include/torch/csrc/api/include" \
    -L "$torch_dir/lib" -Wl,-rpath,"$torch_dir/lib" -Wl,--no-as-needed -ltorch -ltorch_cpu -lc10
echo "$out"
