"""The SUN RGB-D reader moved to cmkd/data/datasets/sunrgbd.py: its names, under the old module name,
with `download` and `validate` that also take the offline sample's `sample:` settings
(cmkd/data/samples/sunrgbd.py), as this module's did."""
from cmkd.data.datasets import sunrgbd as _reader
from cmkd.data.samples.sunrgbd import download, validate  # noqa: F401

globals().update({k: v for k, v in vars(_reader).items()
                 if not k.startswith("__") and k not in ("download", "validate")})
