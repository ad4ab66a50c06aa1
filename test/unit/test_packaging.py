"""The product apart from its harness (issue 33): the `sglang-kvalloc` wheel carries the plugin
and nothing a server does not need, and its one .pth only loads upstream's plugins early and
makes the modules that would be upstream's importable under their upstream names and the
others under the names the upstream series gives them (issue 34). In a production install
(the wheel alone) nothing but those three finders is added at interpreter start, and a broken
`sgl_kernel` fails as upstream's does."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HARNESS_MODULES = ("serving", "demo", "tiny_model", "real_model", "series", "kernels")


@pytest.fixture(scope="module")
def product_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(REPO / "python")],
        check=True, timeout=300,
    )  # fmt: skip
    (wheel,) = out.glob("sglang_kvalloc-*.whl")
    return wheel


def test_the_wheel_carries_no_harness(product_wheel: Path) -> None:
    names = zipfile.ZipFile(product_wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"sglang_kvalloc", "sglang_kvalloc_bootstrap.pth"} | {
        name for name in top if name.endswith(".dist-info")
    }
    for module in HARNESS_MODULES:
        assert not [n for n in names if n.startswith(f"sglang_kvalloc/{module}")], module
    assert "sglang_kvalloc/in_tree/sglang/srt/mem_cache/segmented/allocator.py" in names
    pth = zipfile.ZipFile(product_wheel).read("sglang_kvalloc_bootstrap.pth").decode()
    assert pth.strip() == "import sglang_kvalloc.early_plugins"


def test_a_production_install_adds_only_the_plugin_hook(
    product_wheel: Path, tmp_path: Path
) -> None:
    """The wheel alone on the path (no site .pth files run, so the harness's editable install
    is not there), its .pth line run as `site` would: two finders added (the early plugin
    loading, and the upstream names of in_tree/, consulted last), nothing imported but the
    standard library, no kernel fallback; the in-tree modules import from the wheel."""
    unpacked = tmp_path / "site"
    zipfile.ZipFile(product_wheel).extractall(unpacked)
    site_packages = sysconfig.get_paths()["purelib"]
    code = f"""
import importlib.util, os, sys
sys.path[:0] = [{str(unpacked)!r}]
sys.path.append({site_packages!r})
before_finders, before_modules = list(sys.meta_path), set(sys.modules)
exec(open({str(unpacked / "sglang_kvalloc_bootstrap.pth")!r}).read())
added = [type(f).__name__ for f in sys.meta_path if f not in before_finders]
print("finders", added)
new = sorted(m for m in set(sys.modules) - before_modules if m.split(".")[0] not in
             sys.stdlib_module_names)
print("modules", new)
print("harness", importlib.util.find_spec("sglang_kvalloc_harness"))
from sglang_kvalloc import in_tree_finder
print("in_tree", in_tree_finder.in_tree_file("sglang.srt.mem_cache.segmented.allocator")[0])
os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
try:
    import sgl_kernel
    print("sgl_kernel", getattr(sgl_kernel, "SGLANG_KVALLOC_FALLBACK_REASON", "real"))
except Exception as exc:  # ImportError, or OSError from a CUDA build
    print("sgl_kernel fails", type(exc).__name__)
"""
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    # The plugin's early loading and the in-tree modules (consulted after upstream's own).
    assert lines["finders"] == "['EarlyPluginLoading', 'InTreeFinder']"
    assert lines["modules"] == (  # on_import: the names of the modules hooked on import
        "['sglang_kvalloc', 'sglang_kvalloc.early_plugins', 'sglang_kvalloc.in_tree_finder',"
        " 'sglang_kvalloc.on_import']"
    )
    assert lines["in_tree"].startswith(str(tmp_path / "site" / "sglang_kvalloc" / "in_tree"))
    assert lines["harness"] == "None"
    assert lines["sgl_kernel"] == "real" or lines["sgl_kernel"].startswith("fails")
