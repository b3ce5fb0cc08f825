// lora_ext._C: the CUDA kernels for CUDA tensors. lora_ext.ops wraps these as torch.library custom ops;
// lora_ext._sim exposes the same functions, with the same signatures, through the CPU simulator.
#include <torch/extension.h>

#include "ops/forward.h"
#include "ops/merge.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "lora_ext's CUDA kernels";
  m.def("merge_", &lora_ext::merge_cuda,
        "W[blocks] += scale * B_j @ A_j in place (transposed: W[:, blocks] += scale * (B_j @ A_j)^T)",
        py::arg("W"), py::arg("A"), py::arg("B"), py::arg("scale"), py::arg("num_blocks"), py::arg("block_ids"),
        py::arg("transposed"));
  m.def("delta_weight_", &lora_ext::delta_weight_cuda,
        "out = the dense scale * delta that merge_ adds (zeros in disabled blocks)", py::arg("out"), py::arg("A"),
        py::arg("B"), py::arg("scale"), py::arg("num_blocks"), py::arg("block_ids"), py::arg("transposed"));
  m.def("swap_", &lora_ext::swap_cuda,
        "W[blocks] += new_scale * B2_j @ A2_j - old_scale * B1_j @ A1_j in place, in one pass",
        py::arg("W"), py::arg("old_A"), py::arg("old_B"), py::arg("old_scale"), py::arg("new_A"), py::arg("new_B"),
        py::arg("new_scale"), py::arg("num_blocks"), py::arg("block_ids"), py::arg("transposed"));
  m.def("linear", &lora_ext::linear_cuda,
        "F.linear(x, W, bias) + scale * (x_lora A^T) B^T in the enabled column blocks (fan_in_fan_out: W is (in, out))",
        py::arg("x"), py::arg("x_lora"), py::arg("weight"), py::arg("bias"), py::arg("A"), py::arg("B"),
        py::arg("scale"), py::arg("num_blocks"), py::arg("block_ids"), py::arg("fan_in_fan_out"));
  m.def("embedding", &lora_ext::embedding_cuda, "weight[ids] + scale * A[:, ids]^T B^T", py::arg("ids"),
        py::arg("weight"), py::arg("A"), py::arg("B"), py::arg("scale"), py::arg("padding_idx"));
}
