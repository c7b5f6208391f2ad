#!/usr/bin/env bash
# Run COMMAND with tcmalloc preloaded when the library is installed; otherwise run it as is, with a note.
#
#   launch/with_tcmalloc.sh COMMAND [ARGS...]
# Env: TCMALLOC=auto (default: look in the usual library folders) | off | /path/to/libtcmalloc*.so
#
# Why: XLA:CPU allocates a step's temp buffer afresh every step. Under glibc's malloc those multi-GB blocks are
# mmap'ed and unmapped each time, so every step page-faults them all in again (~4 s of system CPU per MAE-base
# step on 2 cores); tcmalloc keeps the freed pages and the faults go away (README "Performance"). Host-side only:
# it also helps the input pipeline, and it is harmless on GPU/TPU hosts. Debian/Ubuntu: apt-get install
# libtcmalloc-minimal4.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  sed -n '2,11p' "$0"; exit 2
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
