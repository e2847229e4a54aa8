"""The compiled hot path (renacerd/_hot.c); everything else is in pyproject.toml."""

from setuptools import Extension, setup

# optional: without a compiler or Python headers the install still succeeds and the daemon
# runs its numpy path (renacerd.capture.assembly logs it once)
setup(ext_modules=[Extension("renacerd._hot", ["renacerd/_hot.c"], optional=True,
                             extra_compile_args=["-O3", "-std=c11"])])
