"""Print the pip requirement of each listed module that does not import.

Used by `make env` so that a machine that already has everything (e.g. an
offline GPU machine) installs nothing and needs no network.
"""

import importlib.util
import sys

# module name -> pip requirement installed when it is missing
REQUIREMENTS = {
    "numpy": "numpy",
    "triton": "triton==3.9.0",
    "pytest": "pytest",
    "hypothesis": "hypothesis",
    "pytest_benchmark": "pytest-benchmark",
    "PIL": "pillow",
    "ninja": "ninja",
    "matplotlib": "matplotlib",
    "transformers": "transformers",
    "safetensors": "safetensors",
}

missing = [REQUIREMENTS[m] for m in sys.argv[1:] if importlib.util.find_spec(m) is None]
print(" ".join(missing))
