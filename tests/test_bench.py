"""lora_ext.bench.forward_kernel_rows (the GPU forward benchmark) runs end to end on tiny CPU layers."""
import torch

from lora_ext import bench


def test_forward_kernel_rows_run_on_cpu():
    rows = bench.forward_kernel_rows("cpu", torch.float32, repeats=1, dim=32, r=2, merged_r=2, tokens=(1, 3))
    cases = {row["case"] for row in rows}
    assert "forward Linear(32, 32) r=2 M=1" in cases
    assert "forward+backward Linear(32, 32) r=2 M=3" in cases
    assert "forward MergedLinear(32, 96) r=2 [T,F,T] M=3" in cases
    for row in rows:
        assert row["ratio"] > 0
        if row["impl"] == "lora_ext" and "target" in row:
            assert "met" in row
    bench.format_table(dict(device="cpu", machine="test", dtype="float32", torch=torch.__version__, date="",
                            rows=rows))
