#!/usr/bin/env bash
# The portability guard (CONTRIBUTING.md): after the suite has passed with this CPU's own kernels and the default
# thread count, run it again under the other kernels torch can choose, another thread count and another MKL code
# path, so that a test whose result depends on the CPU fails here and not only on a CI machine of another make.
# usage: scripts/portability-guard.sh PYTHON [pytest args...]
set -euo pipefail
py=${1:?usage: portability-guard.sh PYTHON [pytest args...]}
shift
args=("$@")  # the pytest arguments; inside pass() "$@" would be pass()'s own
native=$("$py" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')
pass() {  # ATEN_CPU_CAPABILITY, threads, MKL_CBWR
    echo "== portability pass: ATEN_CPU_CAPABILITY=$1, $2 thread(s), MKL_CBWR=$3 (this CPU: $native)"
    ATEN_CPU_CAPABILITY=$1 OMP_NUM_THREADS=$2 MKL_NUM_THREADS=$2 MKL_CBWR=$3 "$py" -m pytest -q -p no:cacheprovider ${args[@]+"${args[@]}"}
}
pass default 1 COMPATIBLE
case "$native" in
    AVX2|AVX512*) pass avx2 1 AVX2 ;;
    *) echo "== portability pass under avx2 skipped: this CPU runs $native kernels only" ;;
esac
