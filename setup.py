"""The one compiled part: the trusted side's fused float32 loops (softmax blocks, SwiGLU).

Optional: where it does not build (no C compiler), the install still succeeds and
teesplit.tee.kernels falls back to numpy. Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "teesplit.tee._kernels",
            ["src/teesplit/tee/_kernels.c"],
            optional=True,
            extra_compile_args=["-O3", "-Wno-psabi"],
        )
    ]
)
