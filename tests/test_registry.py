"""One registration pattern for methods, models and datasets (cmkd/utils/registry.py): names found
in the source, a lookup imports only the registering module, an unknown name is a ConfigError
naming the params key and the known names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cmkd.errors import ConfigError
from cmkd.utils.registry import Registry, registered_names

ROOT = Path(__file__).resolve().parents[1]


def test_names_come_from_the_decorators_in_the_source(tmp_path):
    (tmp_path / "a.py").write_text('@reg("one", "two")\ndef prepare(): ...\n@other("x")\nclass C: ...\n')
    (tmp_path / "b.py").write_text('@REGISTRY.reg("three")\nclass B: ...\n')
    (tmp_path / "_private.py").write_text('@reg("hidden")\nclass H: ...\n')
    assert registered_names(tmp_path, "pkg", "reg") == {"one": "pkg.a", "two": "pkg.a", "three": "pkg.b"}


@pytest.mark.parametrize("lookup, key, known", [
    ("cmkd.methods:get_method", "runs.x.method", "kd"),
    ("cmkd.data.registry:dataset_module", "datasets", "sunrgbd-sample"),
])
def test_an_unknown_name_names_the_key_and_the_known_names(lookup, key, known):
    module, func = lookup.split(":")
    with pytest.raises(ConfigError) as err:
        getattr(__import__(module, fromlist=[func]), func)("no-such-name", key)
    assert err.value.key == key and "no-such-name" in err.value.problem and repr(known) in err.value.problem


def test_an_unknown_architecture_names_the_key():
    from cmkd.models import build_model

    with pytest.raises(ConfigError) as err:
        build_model({"arch": "nope"}, (3,), 2, "models.synthetic.teacher")
    assert err.value.key == "models.synthetic.teacher.arch" and "'mlp'" in err.value.problem


def test_a_lookup_imports_only_the_registering_module():
    code = ("import json, sys; from cmkd.methods import get_method; from cmkd.models import build_model; "
            "from cmkd.data.registry import dataset_module; get_method('kd'); build_model({'arch': 'mlp'}, (4,), 2); "
            "dataset_module('sunrgbd-sample'); print(json.dumps(sorted(m for m in sys.modules if "
            "m.startswith('cmkd'))))")
    env = {"CMKD_CPU_KERNELS": "native", "PATH": "/usr/bin:/bin"}
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                                           text=True, check=True).stdout))
    assert {"cmkd.methods.kd", "cmkd.models.mlp", "cmkd.data.samples.sunrgbd", "cmkd.data.datasets.sunrgbd"} <= loaded
    assert not {"cmkd.methods.dkd", "cmkd.models.resnet", "cmkd.data.datasets.nyudv2"} & loaded


def test_registering_a_name_twice_is_refused():
    registry = Registry("thing", [], decorator="register")
    registry.register("a")(int)
    registry.register("a")(int)  # the same object again (a re-import) is fine
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("a")(str)
