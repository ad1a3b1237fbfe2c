// The Python module both executors (CPU and CUDA) expose: one binding, so the runtime sees the
// same interface whatever the target. Include after the target header (it defines ffc_kernel_fn).
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

extern "C" {
extern const int ffc_num_kernels;
extern const char* const ffc_kernel_names[];
extern const ffc_kernel_fn ffc_kernel_table[];
}

template <class Executor>
void ffc_define_module(pybind11::module_& m, const char* doc, const std::string& isa,
                       double (*read_bandwidth)(int64_t, int, int)) {
  namespace py = pybind11;
  m.doc() = doc;
  py::class_<Executor>(m, "Executor")
      .def(py::init<int>(), py::arg("threads") = 0)
      .def("bind", &Executor::bind)
      .def("run", &Executor::run)
      .def("profile", &Executor::profile)
      .def_property_readonly("threads", &Executor::threads);
  m.def("isa", [isa] { return isa; });
  m.def("kernel_names", [] {
    std::vector<std::string> out;
    for (int i = 0; i < ffc_num_kernels; ++i) out.push_back(ffc_kernel_names[i]);
    return out;
  });
  m.def("read_bandwidth", read_bandwidth, py::arg("bytes"), py::arg("reps") = 5, py::arg("threads") = 0);
}
