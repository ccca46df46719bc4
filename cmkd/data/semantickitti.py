"""The SemanticKITTI reader moved to cmkd/data/datasets/semantickitti.py; `cmkd.data.semantickitti`
is that module, under its old name."""
import sys

from cmkd.data.datasets import semantickitti

sys.modules[__name__] = semantickitti
