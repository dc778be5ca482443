// The Python module mas_ext._C: importing it loads this library, whose static
// initialisers register every op of the `mas_ext` namespace with the dispatcher
// (schemas in the TORCH_LIBRARY_FRAGMENT blocks, kernels in TORCH_LIBRARY_IMPL).
#include <Python.h>

static struct PyModuleDef mas_ext_module = {PyModuleDef_HEAD_INIT, "_C", "mas_ext compiled ops (see torch.ops.mas_ext)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mas_ext_module); }
