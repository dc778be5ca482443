// The Python module mas_ext._C: importing it loads this library, whose static
// initialisers register every op of the `mas_ext` namespace with the dispatcher
// (schemas in the TORCH_LIBRARY_FRAGMENT blocks, kernels in TORCH_LIBRARY_IMPL). Its one function,
// cpu_kernel(), names the kernel the CPU importance ops run, for mas_ext.backend().
#include <Python.h>

namespace mas_ext {
const char* cpu_kernel_name();  // csrc/cpu/importance_cpu.cpp
}

static PyObject* cpu_kernel(PyObject*, PyObject*) { return PyUnicode_FromString(mas_ext::cpu_kernel_name()); }

static PyMethodDef mas_ext_methods[] = {
    {"cpu_kernel", cpu_kernel, METH_NOARGS,
     "The kernel the CPU importance ops run (the AVX-512 or AVX2 register kernel, or the GEMM-then-|.| tiles), "
     "and MAS_EXT_CPU_KERNEL where it chose it."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef mas_ext_module = {PyModuleDef_HEAD_INIT, "_C", "mas_ext compiled ops (see torch.ops.mas_ext)", -1,
                                            mas_ext_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mas_ext_module); }
