#!/usr/bin/env bash
# Run COMMAND with tcmalloc preloaded when the library is installed; otherwise run it as is, with a note.
#
#   launch/with_tcmalloc.sh COMMAND [ARGS...]
# Env: TCMALLOC=auto (default: look in the usual library folders) | off | /path/to/libtcmalloc*.so
#
# Why: XLA:CPU allocates a step's temp buffer afresh every step. Under glibc's malloc those multi-GB blocks go
# back to the kernel when freed, so every step faults them in (zeroed) again: ~4 s of system CPU per MAE-base step
# on 2 cores. tcmalloc keeps the freed pages for reuse: ~0.04 s, and the step runs 1.2-1.4x faster
# (README "Performance"). It changes no numerics. Debian/Ubuntu: apt-get install libtcmalloc-minimal4.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  sed -n '2,10p' "$0"; exit 2
fi
lib=${TCMALLOC:-auto}
case $lib in
  off) lib="" ;;
  auto)
    lib=""
    for d in /usr/lib/x86_64-linux-gnu /lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /lib/aarch64-linux-gnu \
             /usr/lib64 /usr/lib /usr/local/lib; do
      for n in libtcmalloc_minimal.so.4 libtcmalloc.so.4; do
        if [[ -f $d/$n ]]; then lib=$d/$n; break 2; fi
      done
    done
    if [[ -z $lib ]]; then
      echo "with_tcmalloc: libtcmalloc not found, using the default malloc (CPU steps run slower;" \
           "apt-get install libtcmalloc-minimal4)" >&2
    fi ;;
  *)
    if [[ ! -f $lib ]]; then echo "with_tcmalloc: TCMALLOC=$lib: no such file" >&2; exit 2; fi ;;
esac
if [[ -n $lib ]]; then export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"; fi
exec "$@"
