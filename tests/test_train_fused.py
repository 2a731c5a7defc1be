"""Training through the fused Triton kernels follows the reference backend step for step.

On a GPU the run is on CUDA and the kernels run natively (benchmarks/run_gpu.sh runs this
file there); elsewhere tests/conftest.py has set TRITON_INTERPRET=1 and the same kernels run
under Triton's CPU interpreter (the tiny model keeps that to a few seconds).
"""
import os

import pytest
import torch

pytest.importorskip("triton", reason="the Triton backend needs the triton package")

from iddc import train  # noqa: E402

from test_train import TINY, read_metrics  # noqa: E402,F401  (tiny_yaml is a fixture there)
from test_train import tiny_yaml  # noqa: E402,F401

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUICK = ["--kmeans-baseline", "false", "--vis-images", "0", "--eval-initial", "false"]


@pytest.mark.parametrize("autocast", ["off", "bf16"])
def test_triton_backend_trains_like_the_reference(tmp_path, tiny_yaml, autocast):
    """Also under --autocast bf16 (bfloat16 logits into the loss; on a GPU, the backbone's and
    head's matmuls on the tensor cores), against the reference under the same autocast."""
    runs = {}
    for backend in ("reference", "triton"):
        runs[backend] = train.main(["--config", tiny_yaml, "--out", str(tmp_path / backend),
                                    "--device", DEVICE, "--backend", backend,
                                    "--autocast", autocast, *QUICK])
        assert runs[backend]["backend"] == backend
    ref, fused = (read_metrics(runs[b]["out"]) for b in ("reference", "triton"))
    assert len(ref) == len(fused) == TINY["train"]["epochs"]
    for r, f in zip(ref, fused):
        for term in ("loss", "pos", "neg", "reg"):
            # per-epoch means of float32 losses, rounded to 6 decimals in metrics.json
            assert f["train"][term] == pytest.approx(r["train"][term], rel=1e-4, abs=2e-6), \
                (r["epoch"], term)
    a = torch.load(os.path.join(runs["reference"]["out"], "last.pt"), weights_only=False)
    b = torch.load(os.path.join(runs["triton"]["out"], "last.pt"), weights_only=False)
    trained = [k for k in a["model"] if not k.startswith("backbone.")]
    assert trained
    for k in trained:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5, msg=k)
