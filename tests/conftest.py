import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # import common, grpo, ... from the repo root
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never touch the network
os.environ.setdefault("USE_HUB_KERNELS", "0")  # nor load layers from the Hub, as transformers 5.25 does by default


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """The embedded tiny model, its tokenizer and EOS ids, on the CPU."""
    import common

    torch.manual_seed(0)
    tokenizer = common.load_tokenizer("tiny")
    model = common.load_model("tiny", torch.device("cpu"))
    return model, tokenizer, common.eos_token_ids(model, tokenizer)
