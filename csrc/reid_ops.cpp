// Python module of the reid_ops extension. The ops themselves are registered with the PyTorch
// dispatcher (TORCH_LIBRARY_FRAGMENT in ops/*.cpp) and reached as torch.ops.reid_ops.*; importing
// this module loads the library so the registrations run.
#include <Python.h>

#include <torch/library.h>

TORCH_LIBRARY(reid_ops, m) {
  // schemas are added by the TORCH_LIBRARY_FRAGMENTs of each op
}

static struct PyModuleDef reid_ops_module = {PyModuleDef_HEAD_INIT, "_C", "reid_ops C++/CUDA kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&reid_ops_module); }

// Reports whether the CUDA kernels were compiled in.
namespace reid_ops {
bool compiled_with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace reid_ops

TORCH_LIBRARY_FRAGMENT(reid_ops, m) {
  m.def("_compiled_with_cuda", &reid_ops::compiled_with_cuda);
}
