"""The thirty-sixth session's fixes, each test failing on the commit before its fix."""
import torch

import lora_ext as lora


def test_a_forward_compiled_before_a_disable_block_is_not_compiled_again_after_it():
    # the block left `_adapter_off = 0` in each layer's __dict__, where the class default had been: every forward
    # compiled before a first disable_adapter block was compiled again after it (one more of dynamo's 8)
    torch.manual_seed(0)
    model = torch.nn.Sequential(lora.Linear(8, 8, r=2), lora.Linear(8, 8, r=2))
    for layer in model:
        torch.nn.init.normal_(layer.lora_B)
    model.eval()  # (merged)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(2, 8)
    with torch.no_grad():
        before = compiled(x)
        assert len(graphs) == 1
        with lora.disable_adapter(model):
            base = compiled(x)
        assert len(graphs) == 2  # (the block's own graph)
        after = compiled(x)
        assert len(graphs) == 2, "compiled again after the block"
        with lora.disable_adapter(model):
            assert torch.allclose(compiled(x), base, atol=1e-6)  # (float32: unmerged in float32)
        assert len(graphs) == 2
    assert torch.allclose(after, before, atol=1e-6) and (base - before).abs().max() > 0.1
    assert all("_adapter_off" not in layer.__dict__ and layer._adapter_off == 0 for layer in model)
