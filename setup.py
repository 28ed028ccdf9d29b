"""Installs sngm_ext (and triton_kernels/ as sngm_ext.triton_kernels).

The native extension (csrc/) is optional: see the build switches below. Install with
``pip install --no-build-isolation -e .`` so the build uses the torch already installed (an isolated
build environment would download a multi-GB CUDA torch).
"""

from setuptools import setup

setup(
    name="sngm-ext",
    version="0.1.0",
    description="SNGM (stochastic normalized gradient descent with momentum) for PyTorch, fused",
    packages=["sngm_ext", "sngm_ext.triton_kernels"],
    package_dir={"sngm_ext": "sngm_ext", "sngm_ext.triton_kernels": "triton_kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={"triton": ["triton>=3.6"]},
)
