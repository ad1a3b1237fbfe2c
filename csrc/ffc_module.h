// The Python module both executors (CPU and CUDA) expose: one binding, so the runtime sees the
// same interface whatever the target. Include after the target header (it defines ffc_kernel_fn).
//
// Memory: an executor owns the memory its kernels read when the runtime asks it to (a CUDA plan
// always: device memory through the CUDA runtime, so no CUDA build of torch is needed; a CPU plan
// under FFC_OWN_MEMORY=1, the same path on the host). Addresses cross as integers: alloc/release,
// upload (host -> executor memory), download (back), copy_rows (a strided copy inside it: count
// groups, stride bytes apart, of height rows of width bytes, pitch bytes apart), memory_info (free, total bytes; -1 unknown).
// Every copy is ordered after the kernels already launched and has completed when it returns.
// device_check(ordinal): "" when the device can run kernels, else why not (no driver, no device).
// trace(graph, T, N, S): one run with (step, thread, start ns, end ns) per kernel (steady clock).
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
      .def(py::init<int, int>(), py::arg("threads") = 0, py::arg("device") = 0)
      .def("bind", &Executor::bind)
      .def("run", &Executor::run)
      .def("profile", &Executor::profile)
      .def("trace", &Executor::trace)
      .def_property_readonly("threads", &Executor::threads)
      .def("alloc", &Executor::alloc, py::arg("bytes"))
      .def("release", &Executor::release, py::arg("address"))
      .def("upload", &Executor::upload, py::arg("dst"), py::arg("src"), py::arg("bytes"))
      .def("download", &Executor::download, py::arg("dst"), py::arg("src"), py::arg("bytes"))
      .def("copy_rows", &Executor::copy_rows, py::arg("dst"), py::arg("src"), py::arg("width"), py::arg("height"),
           py::arg("pitch"), py::arg("count"), py::arg("stride"))
      .def("memory_info", &Executor::memory_info);
  m.def("device_check", &Executor::device_check, py::arg("ordinal") = 0);
  m.def("isa", [isa] { return isa; });
  m.def("kernel_names", [] {
    std::vector<std::string> out;
    for (int i = 0; i < ffc_num_kernels; ++i) out.push_back(ffc_kernel_names[i]);
    return out;
  });
  m.def("read_bandwidth", read_bandwidth, py::arg("bytes"), py::arg("reps") = 5, py::arg("threads") = 0);
}
