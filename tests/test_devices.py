"""iddc.devices.resolve_device: the one place a --device name becomes a torch.device."""
import pytest
import torch

from iddc.devices import resolve_device


@pytest.mark.parametrize("name, message", [
    ("gpu", r"--device 'gpu' is not a device; expected 'auto', 'cpu', 'cuda'"),
    ("meta", "--device meta: only cpu, cuda and mps devices are supported"),
    ("cpu:1", r"--device cpu:1: there is one CPU device \(cpu, or cpu:0\); iddc.train's "
              r"--threads, or OMP_NUM_THREADS, sets how many cores it uses"),
], ids=["unknown", "meta", "cpu-index"])
def test_bad_device_names_are_refused_by_name(name, message):
    with pytest.raises(ValueError, match=message):
        resolve_device(name)


def test_cpu_and_auto_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cpu:0") == torch.device("cpu:0")
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
        with pytest.raises(ValueError, match="this machine has .* CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
            resolve_device("cuda")
