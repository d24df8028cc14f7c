"""The layers point one way: kernels_pallas <- sunjax <- train, serve <- apps.

Each package (every module in it) is imported in a fresh interpreter, and the packages it may
not depend on must be absent from ``sys.modules`` afterwards."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORBIDDEN = {
    "kernels_pallas": {"sunjax", "train", "serve", "apps"},
    "sunjax": {"train", "serve", "apps"},
    "train": {"serve", "apps"},
    "serve": {"train", "apps"},
}
PROBE = """
import importlib, json, pkgutil, sys
pkg = importlib.import_module(sys.argv[1])
names = [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"imported": names, "modules": sorted(sys.modules)}))
"""


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_no_higher_layer(package):
    out = subprocess.run(
        [sys.executable, "-c", PROBE, package],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert len(result["imported"]) >= 2  # the walk found the package's modules
    top = {name.split(".")[0] for name in result["modules"]}
    assert package in top
    assert not top & FORBIDDEN[package], f"{package} imports {sorted(top & FORBIDDEN[package])}"
