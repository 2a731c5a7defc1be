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
        "torch>=2.1",
        "torchvision>=0.16",
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
    entry_points={"console_scripts": [
        "iddc-train=iddc.train:main",
        "iddc-evaluate=iddc.evaluate:main",
        "iddc-predict=iddc.predict:main",
    ]},
)
