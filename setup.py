"""Packaging for idefender-gpu.

The top-level folder ``kernels/`` is installed as the sub-package ``idefender_gpu.kernels``
(never as a top-level ``kernels`` package: that import name belongs to another PyPI project).
"""

from setuptools import find_packages, setup

setup(
    name="idefender-gpu",
    version="0.1.0",
    description=(
        "GPU-native Gaussian mixtures (a scikit-learn drop-in) and the I-defender "
        "adversarial-input detector"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["idefender_gpu", "idefender_gpu.*"]) + ["idefender_gpu.kernels"],
    package_dir={"idefender_gpu.kernels": "kernels"},
    # torch is pinned by the install instructions (torch==2.14.1 first); any torch >= 2.1 works.
    install_requires=["torch>=2.1", "numpy", "safetensors", "tqdm"],
    extras_require={
        "keops": ["pykeops>=2.3"],
        "dev": [
            "pytest",
            "hypothesis",
            "scikit-learn>=1.6",
            "scipy",
            "matplotlib",
            "safetensors",
            "tqdm",
        ],
    },
    entry_points={"console_scripts": ["idefender-gpu=idefender_gpu.cli:main"]},
    license="BSD-3-Clause",
)
