import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
# Triton kernels run under the interpreter on the CPU, unless a GPU session asks for the real thing
# (GENFORGE_TEST_DEVICE=cuda python -m pytest tests/test_triton.py).
if os.environ.get("GENFORGE_TEST_DEVICE") != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")
