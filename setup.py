from setuptools import find_packages, setup

setup(
    name="iddc",
    version="0.1.0",
    description="IDDC unsupervised semantic segmentation with fused, exact pair-loss kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["iddc", "iddc.*"]) + ["iddc_kernels"],
    # the kernels live in kernels/ but must never be importable as `kernels` (a PyPI name)
    package_dir={"iddc_kernels": "kernels"},
    install_requires=[
        # torch.is_autocast_enabled(device_type) is 2.4's, serialization.safe_globals 2.5's
        "torch>=2.5",
        "torchvision>=0.20",
        "timm>=0.9",
        "numpy",
        "scipy",
        "pillow",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark"],
    },
    # as `python -m iddc.<tool>` (iddc.cli.SCRIPTS): one-line errors, exit status 0 on success
    entry_points={"console_scripts": [
        "iddc-train=iddc.cli:train_script",
        "iddc-evaluate=iddc.cli:evaluate_script",
        "iddc-predict=iddc.cli:predict_script",
        "iddc-check-layout=iddc.cli:check_layout_script",
    ]},
)
