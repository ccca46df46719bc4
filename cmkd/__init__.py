"""cmkd: cross-modal knowledge distillation, reproducible.

Importing the package has no side effects; every submodule is imported on demand.
"""

__version__ = "0.1.0"
