"""Fused Triton kernels of iddc, installed under the import name ``iddc_kernels``."""
if __name__.split(".")[0] != "iddc_kernels":
    # `kernels` is another PyPI package's name; this folder must only load as iddc_kernels
    raise ImportError("this folder is installed as `iddc_kernels` (see setup.py package_dir); "
                      "import iddc_kernels, not kernels")

from .pair_sums import TritonPairSums, triton_pair_sums  # noqa: E402

__all__ = ["triton_pair_sums", "TritonPairSums"]
