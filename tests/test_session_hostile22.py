"""Small findings of the twenty-ninth session's hostile rounds."""
import pytest
import torch

import lora_ext as lora


def test_a_stored_adapter_that_overflows_only_when_cast_says_so():
    """Finite float32 factors past float16's range, behind float16 live factors (layer.half()), were refused as
    holding non-finite values."""
    layer = lora.Linear(4, 4, r=2)
    layer.add_adapter("big", torch.full((2, 4), 1e5), torch.full((4, 2), 1e-4), 1.0)
    layer.half()
    with pytest.raises(ValueError, match=r"stored in torch.float32; cast to the live factors' torch.float16, past its "
                                         r"range\): lora_A holds non-finite"):
        layer.set_adapter("big")
    assert layer.active_adapter == "default"
