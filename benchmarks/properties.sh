#!/bin/sh
# The property suite's large profile (150 random cases per property instead of 6):
#   sh benchmarks/properties.sh
exec env DECODERSCOPE_PROPERTIES=large .venv/bin/python -m pytest -q tests/test_properties.py "$@"
