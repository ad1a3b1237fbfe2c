// ffc plan executor: runs a whole graph (every kernel of a prefill or decode step) in one call
// from Python, inside one OpenMP parallel region with a barrier between kernels.
// OpenMP (the libgomp torch already loaded) rather than a private pool: a second set of
// spinning threads competes with torch's own OpenMP workers for the same cores; measured
// 20-40% slower decode steps on a 2-core VM.
// The plan (which kernel, which pointers) is bound once from Python; a step allocates nothing.
#include <omp.h>
#include <sys/mman.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "ffc_cpu.h"
#include "ffc_module.h"
#include "ffc_stream.h"


static inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

extern "C" void ffc_barrier() {
#pragma omp barrier
}

namespace py = pybind11;

namespace {

struct Step {
  ffc_kernel_fn fn;
  std::vector<void*> args;
};

class Executor {
 public:
  Executor(int threads, int) : threads_(threads > 0 ? threads : omp_get_max_threads()) {
    for (int i = 0; i < ffc_num_kernels; ++i) kernels_[ffc_kernel_names[i]] = ffc_kernel_table[i];
    kernels_["ffc.stream.begin"] = ffc_stream_begin;     // weight streaming steps (ffc_stream.h)
    kernels_["ffc.stream.wait"] = ffc_stream_wait;
    kernels_["ffc.stream.release"] = ffc_stream_release;
  }

  void bind(const std::string& graph, const std::vector<std::pair<std::string, std::vector<uintptr_t>>>& steps) {
    std::vector<Step> prog;
    prog.reserve(steps.size());
    for (const auto& s : steps) {
      auto it = kernels_.find(s.first);
      if (it == kernels_.end()) throw std::runtime_error("kernel " + s.first + " is not in this library; rebuild it");
      Step st{it->second, {}};
      for (uintptr_t a : s.second) st.args.push_back(reinterpret_cast<void*>(a));
      prog.push_back(std::move(st));
    }
    graphs_[graph] = std::move(prog);
  }

  void run(const std::string& graph, int64_t T, int64_t N, int64_t S) {
    const std::vector<Step>& prog = get(graph);
    const int64_t dims[3] = {T, N, S};
    py::gil_scoped_release nogil;
#pragma omp parallel num_threads(threads_)
    {
      const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
      for (const Step& s : prog) {
        s.fn(s.args.data(), dims, tid, nth);
#pragma omp barrier
      }
    }
  }

  // Seconds per kernel, each kernel timed between barriers (median over `reps` runs is done in Python).
  std::vector<double> profile(const std::string& graph, int64_t T, int64_t N, int64_t S) {
    const std::vector<Step>& prog = get(graph);
    const int64_t dims[3] = {T, N, S};
    std::vector<double> times(prog.size(), 0.0);
    py::gil_scoped_release nogil;
#pragma omp parallel num_threads(threads_)
    {
      const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
      for (size_t i = 0; i < prog.size(); ++i) {
        auto t0 = std::chrono::steady_clock::now();
        prog[i].fn(prog[i].args.data(), dims, tid, nth);
#pragma omp barrier
        if (tid == 0) times[i] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      }
    }
    return times;
  }

  // Trace of one run: (step, thread, start, end) per kernel and thread, each thread's own time in
  // the kernel until it reaches the barrier, in steady-clock nanoseconds (CLOCK_MONOTONIC: Python's
  // time.monotonic_ns). A method of its own: run() takes no timestamps.
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> trace(const std::string& graph, int64_t T, int64_t N,
                                                                     int64_t S) {
    const std::vector<Step>& prog = get(graph);
    const int64_t dims[3] = {T, N, S};
    std::vector<std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>> per(threads_);
    {
      py::gil_scoped_release nogil;
#pragma omp parallel num_threads(threads_)
      {
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        auto& mine = per[tid];
        mine.reserve(prog.size());
        for (size_t i = 0; i < prog.size(); ++i) {
          const int64_t t0 = now_ns();
          prog[i].fn(prog[i].args.data(), dims, tid, nth);
          mine.emplace_back(int64_t(i), int64_t(tid), t0, now_ns());
#pragma omp barrier
        }
      }
    }
    std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> out;
    for (auto& v : per) out.insert(out.end(), v.begin(), v.end());
    return out;
  }

  int threads() const { return threads_; }

  // Host memory of its own (ffc_module.h): the CPU twin of the CUDA executor's device memory.
  static std::string device_check(int) { return ""; }
  uintptr_t alloc(int64_t bytes) {
    if (bytes < 0) throw std::invalid_argument("alloc: negative size");
    void* p = std::aligned_alloc(64, size_t((bytes + 63) / 64 * 64 + 64));
    if (p == nullptr) throw std::bad_alloc();
    return reinterpret_cast<uintptr_t>(p);
  }
  void release(uintptr_t p) { std::free(reinterpret_cast<void*>(p)); }
  void upload(uintptr_t dst, uintptr_t src, int64_t bytes) { copy(dst, src, bytes); }
  void download(uintptr_t dst, uintptr_t src, int64_t bytes) { copy(dst, src, bytes); }
  void copy_rows(uintptr_t dst, uintptr_t src, int64_t width, int64_t height, int64_t pitch, int64_t count,
                 int64_t stride) {
    for (int64_t g = 0; g < count; ++g)
      for (int64_t r = 0; r < height; ++r) copy(dst + g * stride + r * pitch, src + g * stride + r * pitch, width);
  }
  std::pair<int64_t, int64_t> memory_info() const { return {-1, -1}; }

 private:
  static void copy(uintptr_t dst, uintptr_t src, int64_t bytes) {
    if (bytes > 0) std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), size_t(bytes));
  }
  const std::vector<Step>& get(const std::string& graph) const {
    auto it = graphs_.find(graph);
    if (it == graphs_.end()) throw std::runtime_error("graph " + graph + " is not bound");
    return it->second;
  }
  int threads_;
  std::unordered_map<std::string, ffc_kernel_fn> kernels_;
  std::unordered_map<std::string, std::vector<Step>> graphs_;
};

// Streaming read bandwidth of this machine (bytes/s) over a buffer of `bytes`: the roofline's
// denominator. Median of `reps` passes with `threads` threads. The buffer is in transparent huge
// pages where the system has them, as the runtime's weights are (runtime/device_memory.py).
double read_bandwidth(int64_t bytes, int reps, int threads) {
  if (threads <= 0) threads = omp_get_max_threads();
  const int64_t n = bytes / sizeof(float);
  const size_t huge = size_t(2) << 20, size = (n * sizeof(float) + huge - 1) / huge * huge;
  float* a = static_cast<float*>(std::aligned_alloc(huge, size));
  if (a == nullptr) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  madvise(a, size, MADV_HUGEPAGE);   // advice only: ordinary pages where it is refused
#endif
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) a[i] = float(i);  // distinct pages: no same-page merging by the host
  std::vector<double> rates;
  volatile float sink = 0.0f;
  py::gil_scoped_release nogil;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    float total = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
      int64_t b, e;
      ffc_split(n, omp_get_thread_num(), omp_get_num_threads(), &b, &e, 4 * FFC_VW);
      ffc_vf s0 = ffc_vzero(), s1 = ffc_vzero(), s2 = ffc_vzero(), s3 = ffc_vzero();
      int64_t i = b;
      for (; i + 4 * FFC_VW <= e; i += 4 * FFC_VW) {
        s0 = ffc_vadd(s0, ffc_vload(a + i));
        s1 = ffc_vadd(s1, ffc_vload(a + i + FFC_VW));
        s2 = ffc_vadd(s2, ffc_vload(a + i + 2 * FFC_VW));
        s3 = ffc_vadd(s3, ffc_vload(a + i + 3 * FFC_VW));
      }
      float t = ffc_vsum(ffc_vadd(ffc_vadd(s0, s1), ffc_vadd(s2, s3)));
      for (; i < e; ++i) t += a[i];
      total += t;
    }
    sink = sink + total;
    rates.push_back(double(n * sizeof(float)) / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::free(a);
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2];
}

}  // namespace

PYBIND11_MODULE(ffc_kernels, m) {
  ffc_define_module<Executor>(m, "ffc generated kernels and plan executor", std::string(FFC_ISA), &read_bandwidth);
  py::class_<FfcStreamer>(m, "Streamer", py::module_local())   // each library its own type: two load in one process
      .def(py::init<const std::string&, const std::vector<std::tuple<int64_t, int64_t, int>>&,
                    const std::vector<uintptr_t>&, bool>(),
           py::arg("path"), py::arg("units"), py::arg("slots"), py::arg("overlap") = true)
      .def("add_sequence", &FfcStreamer::add_sequence)
      .def("attach_kv", &FfcStreamer::attach_kv, py::arg("path"), py::arg("units"), py::arg("slots"))
      .def("set_kv", &FfcStreamer::set_kv, py::arg("reads"), py::arg("writes"))
      .def("kv_stats", &FfcStreamer::kv_stats)
      .def("stats", &FfcStreamer::stats)
      .def_property_readonly("address", [](FfcStreamer& s) { return reinterpret_cast<uintptr_t>(&s); });
}

// The extension's entry point, PyInit_<the build's name>, sits in a one-line object build.ninja
// generates (module_init.o) and returns this definition: the name changes with every edit of the
// sources, this file does not, so ninja never recompiles it for an edit elsewhere.
extern "C" __attribute__((visibility("hidden"))) PyObject* ffc_module_init() { return PyInit_ffc_kernels(); }
