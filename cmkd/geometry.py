"""The geometry moved to cmkd/data/geometry.py; `cmkd.geometry` is that module, under its old name."""
import sys

from cmkd.data import geometry

sys.modules[__name__] = geometry
