"""Builds the native paced RTP sender (gateway/media/_rtpsend.c); everything else about the
package (name, version, dependencies) is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gateway.media._rtpsend",
            sources=["gateway/media/_rtpsend.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
