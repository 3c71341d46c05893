"""Build shim: cffi's API-mode extension must be declared through setup(); all other
metadata lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["aioxen/_native_build.py:ffibuilder"])
