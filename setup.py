"""Builds shmbroker._native from native/ (plain C11 plus one CPython glue file).

Everything else about the package lives in pyproject.toml; setuptools still needs setup.py
to declare a C extension in a way every supported setuptools understands.
"""
import glob
import platform

from setuptools import Extension, setup

extra_compile_args = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                      "-fno-strict-aliasing", "-D_GNU_SOURCE"]

setup(
    ext_modules=[
        Extension(
            "shmbroker._native",
            sources=sorted(glob.glob("native/src/*.c")),
            include_dirs=["native/include"],
            depends=sorted(glob.glob("native/include/shmb/*.h")),
            extra_compile_args=extra_compile_args,
        )
    ],
)
