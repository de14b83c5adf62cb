"""Build script: package layout plus the torch-free pybind11 extension `mrt_engine._C`.

`kernels/` and `trainer/` install as `mrt_engine.kernels` and `mrt_engine.trainer` so that no
top-level module named `kernels` (a PyPI package transformers probes for) or `trainer` exists.
"""
import glob
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

core_sources = sorted(glob.glob("csrc/*.cpp"))
ext_modules = []
if core_sources and os.environ.get("MRT_ENGINE_NO_EXT", "0") != "1":
    ext_modules.append(
        Pybind11Extension(
            "mrt_engine._C",
            core_sources,
            include_dirs=["csrc"],
            depends=sorted(glob.glob("csrc/*.h")),   # a header edit rebuilds the extension
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    )

setup(
    packages=[
        "mrt_engine",
        "mrt_engine.kv",
        "mrt_engine.attention",
        "mrt_engine.models",
        "mrt_engine.kernels",
        "mrt_engine.trainer",
        "mrt_engine.trainer.toy",
    ],
    package_dir={
        "mrt_engine": "mrt_engine",
        "mrt_engine.kernels": "kernels",
        "mrt_engine.trainer": "trainer",
        "mrt_engine.trainer.toy": "trainer/toy",
    },
    package_data={"mrt_engine.trainer.toy": ["model/*"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
