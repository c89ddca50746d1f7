#!/usr/bin/env bash
# Install klass-patch (a regular, non-editable copy of this checkout) into the current Python environment (the
# python3 on PATH: activate a venv first, or set PYTHON=), rewrite the Dream/LLaDA files it finds (or the ones
# named: bash install.sh --dream PATH --llada PATH), then run the built-in tiny demo.
# Paths are taken from the folder you run it in (it does not cd into the checkout).
# An existing torch is never replaced; without one, torch==2.13.0 is installed. numpy is added if missing
# (torch warns "Failed to initialize NumPy" without it).
set -euo pipefail
CHECKOUT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"   # the environment to install into: activate a venv first, or PYTHON=/path/to/python
echo "klass-patch: installing into $("$PYTHON" -c 'import sys; print(sys.prefix)') ($PYTHON)"

if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "klass-patch: using the installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
else
    echo "klass-patch: no torch found; installing torch==2.13.0"
    "$PYTHON" -m pip install -q "torch==2.13.0"
fi
"$PYTHON" -c "import numpy" 2>/dev/null || "$PYTHON" -m pip install -q numpy
"$PYTHON" -m pip install -q "$CHECKOUT"
echo "klass-patch: installed $("$PYTHON" -c 'import klass_patch; print(klass_patch.__version__)')"
echo
"$PYTHON" -m klass_patch install "$@"   # without --dream/--llada: the Hugging Face caches and ./generate.py
echo
"$PYTHON" -m klass_patch demo
