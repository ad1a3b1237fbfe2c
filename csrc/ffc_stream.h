// Weight streaming for offloaded artifacts (runtime/offload.py): units of weights (a layer's, or
// one large weight) that are not resident are read from a file on disk into a few slot buffers
// the kernels are bound to. A graph's program gets three kinds of steps (registered by the
// executor as kernels, run by thread 0 while the others wait at the barrier after them):
//   begin(seq)   the unit sequence this run reads, in order: the reader starts on it;
//   wait(u)      before the first kernel reading unit u: returns once u is in its slot;
//   release(u)   after the last one: the slot may be overwritten.
// With overlap a background thread reads ahead: unit k + 1 (next slot) while unit k computes,
// and after the last unit of a run the first ones of the next (the same graph, predicted); a
// begin() for another sequence drops predictions that are wrong. Without overlap, wait() reads
// the unit itself (the baseline the block schedule is measured against).
// Reads are pread(2) on a file opened O_DIRECT when the file system allows it (aligned slots and
// offsets): the page cache holds none of the weights, so the memory budget holds and the disk is
// read for real; else buffered pread followed by POSIX_FADV_DONTNEED on the range.
// KV cache units (attach_kv; runtime/kv_stream.py): a layer's KV pool kept in a second file, read
// into one of its own slots in the page ranges set_kv() names for the coming run (the blocks its
// sequences read), and written back in the ranges it writes (their newest blocks) once released:
// before anything else is read into that slot. The reader never reads a KV unit of a run ahead of
// that run's begin() (its ranges are not known before).
#pragma once
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

class FfcStreamer {
 public:
  // units: (file offset, bytes, slot) each, bytes a multiple of 4096 when direct; slots: addresses.
  FfcStreamer(const std::string& path, const std::vector<std::tuple<int64_t, int64_t, int>>& units,
              const std::vector<uintptr_t>& slots, bool overlap)
      : units_(units), kind_(units.size(), 0), slots_(slots), holds_(slots.size(), -1), free_(slots.size(), 1),
        pending_(slots.size(), -1), pending_ranges_(slots.size()), overlap_(overlap) {
    for (const auto& u : units_)
      if (std::get<2>(u) < 0 || size_t(std::get<2>(u)) >= slots_.size())
        throw std::invalid_argument("stream unit names a slot that does not exist");
    fd_ = ::open(path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
    direct_ = fd_ >= 0;
    if (fd_ < 0) fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw std::runtime_error("cannot open " + path + ": " + std::strerror(errno));
    if (overlap_) reader_ = std::thread([this] { loop(); });
  }
  ~FfcStreamer() {
    {
      std::lock_guard<std::mutex> g(m_);
      stop_ = true;
    }
    cv_.notify_all();
    if (reader_.joinable()) reader_.join();
    ::close(fd_);
    if (kv_fd_ >= 0) ::close(kv_fd_);
  }

  // KV units (file offset, bytes, slot among ``slots``) in the file at ``path``; the index of the
  // first. Before any run (the reader idle).
  int attach_kv(const std::string& path, const std::vector<std::tuple<int64_t, int64_t, int>>& units,
                const std::vector<uintptr_t>& slots) {
    std::lock_guard<std::mutex> g(m_);
    if (cur_ >= 0 || loading_ || kv_fd_ >= 0) throw std::logic_error("attach_kv: once, before any run");
    const int first = int(units_.size()), base = int(slots_.size());
    for (const auto& u : units) {
      if (std::get<2>(u) < 0 || size_t(std::get<2>(u)) >= slots.size())
        throw std::invalid_argument("KV unit names a slot that does not exist");
      units_.emplace_back(std::get<0>(u), std::get<1>(u), base + std::get<2>(u));
      kind_.push_back(1);
      kv_bytes_ = std::max(kv_bytes_, std::get<1>(u));
    }
    for (uintptr_t a : slots) {
      slots_.push_back(a), holds_.push_back(-1), free_.push_back(1), pending_.push_back(-1);
      pending_ranges_.emplace_back();
    }
    kv_fd_ = ::open(path.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
    kv_direct_ = kv_fd_ >= 0;
    if (kv_fd_ < 0) kv_fd_ = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (kv_fd_ < 0) throw std::runtime_error("cannot open " + path + ": " + std::strerror(errno));
    return first;
  }

  // the byte ranges (within a KV unit) the coming run reads and writes: whole pages, in the unit
  void set_kv(const std::vector<std::pair<int64_t, int64_t>>& reads,
              const std::vector<std::pair<int64_t, int64_t>>& writes) {
    for (const auto* rs : {&reads, &writes})
      for (const auto& r : *rs)
        if (r.first < 0 || r.second <= 0 || r.first + r.second > kv_bytes_ || r.first % 4096 || r.second % 4096)
          throw std::invalid_argument("KV range outside the unit or not whole pages");
    std::lock_guard<std::mutex> g(m_);
    kv_read_ = reads, kv_write_ = writes;
  }

  int add_sequence(const std::vector<int>& seq) {
    for (int u : seq)
      if (u < 0 || size_t(u) >= units_.size()) throw std::invalid_argument("stream sequence names no unit");
    seqs_.push_back(seq);
    std::vector<int> at(units_.size(), -1);
    for (size_t k = 0; k < seq.size(); ++k) at[size_t(seq[k])] = int(k);
    at_.push_back(std::move(at));
    return int(seqs_.size()) - 1;
  }

  void begin(int seq) {
    std::unique_lock<std::mutex> g(m_);
    cv_.wait(g, [&] { return !loading_; });   // a read in flight finishes first (at most one unit)
    const std::vector<int>& s = seqs_.at(size_t(seq));
    // keep what is in a slot only if it is the first unit this run wants there
    std::vector<int> first(slots_.size(), -1);
    for (int u : s)
      if (first[size_t(slot(u))] < 0) first[size_t(slot(u))] = u;
    for (size_t k = 0; k < slots_.size(); ++k) {
      if (holds_[k] != first[k] || (holds_[k] >= 0 && kind_[size_t(holds_[k])])) holds_[k] = -1;   // KV: read again
      free_[k] = holds_[k] < 0;   // a slot holding its first unit is wanted as it is
    }
    cur_ = seq;
    pos_ = 0;
    cv_.notify_all();
  }

  void wait(int u) {
    const int s = slot(u);
    if (!overlap_) {
      if (holds_[size_t(s)] == u) return;
      holds_[size_t(s)] = -1;
      std::vector<std::pair<int64_t, int64_t>> ranges;
      {
        std::lock_guard<std::mutex> g(m_);
        ranges = kv_read_;
      }
      const std::string why = read_unit(u, ranges);
      if (why.size()) fail(why);
      holds_[size_t(s)] = u;
      std::lock_guard<std::mutex> g(m_);
      read_s_ += last_read_s_, ++reads_;
      return;
    }
    std::unique_lock<std::mutex> g(m_);
    // the reader never goes back to a unit the kernels are past (it would read it again, into a
    // slot nobody releases)
    const int at = cur_ >= 0 ? at_[size_t(cur_)][size_t(u)] : -1;
    if (at >= 0 && pos_ <= size_t(at) && holds_[size_t(s)] == u && !loading_unit(u)) pos_ = size_t(at) + 1;
    if (holds_[size_t(s)] == u && !loading_unit(u)) return;
    const auto t0 = std::chrono::steady_clock::now();
    cv_.wait(g, [&] { return error_.size() || (holds_[size_t(s)] == u && !loading_unit(u)); });
    waited_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (error_.size()) fail(error_);
  }

  void release(int u) {
    const size_t k = size_t(slot(u));
    if (!overlap_) {      // a KV unit is written back now
      if (kind_[size_t(u)] && holds_[k] == u) {
        std::vector<std::pair<int64_t, int64_t>> ranges;
        {
          std::lock_guard<std::mutex> g(m_);
          ranges = kv_write_;
        }
        const std::string why = write_unit(u, ranges);
        if (why.size()) fail(why);
      }
      return;
    }
    {
      std::lock_guard<std::mutex> g(m_);
      if (holds_[k] == u) {
        free_[k] = 1;
        if (kind_[size_t(u)]) pending_[k] = u, pending_ranges_[k] = kv_write_;   // written before k is read into
      }
    }
    cv_.notify_all();
  }

  // KV cache bytes read, bytes written, seconds reading and writing them
  std::tuple<int64_t, int64_t, double> kv_stats() {
    std::lock_guard<std::mutex> g(io_m_);
    return {kv_read_bytes_, kv_written_bytes_, kv_s_};
  }

  // bytes read, seconds reading, seconds kernels waited for a read, reads, whether O_DIRECT
  std::tuple<int64_t, double, double, int64_t, bool> stats() {
    std::lock_guard<std::mutex> g(m_);
    std::lock_guard<std::mutex> io(io_m_);
    return {bytes_, read_s_, overlap_ ? waited_ : read_s_, reads_, direct_};
  }

 private:
  int slot(int u) const { return std::get<2>(units_[size_t(u)]); }
  bool loading_unit(int u) const { return loading_ && loading_u_ == u; }

  // pread the whole unit into its slot (a KV unit: the ``ranges`` of it); "" or why not
  std::string read_unit(int u, const std::vector<std::pair<int64_t, int64_t>>& ranges) {
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t off = std::get<0>(units_[size_t(u)]), n = std::get<1>(units_[size_t(u)]);
    char* dst = reinterpret_cast<char*>(slots_[size_t(slot(u))]);
    std::string why;
    int64_t moved = 0;
    if (kind_[size_t(u)]) {
      for (const auto& r : ranges) {
        why = transfer(kv_fd_, false, dst + r.first, r.second, off + r.first, kv_direct_);
        if (why.size()) return why;
        moved += r.second;
      }
    } else {
      why = transfer(fd_, false, dst, n, off, direct_);
      moved = n;
    }
    last_read_s_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::lock_guard<std::mutex> g(io_m_);
    bytes_ += moved;
    if (kind_[size_t(u)]) kv_read_bytes_ += moved, kv_s_ += last_read_s_;
    return why;
  }

  // write the ``ranges`` of KV unit u back from its slot; "" or why not
  std::string write_unit(int u, const std::vector<std::pair<int64_t, int64_t>>& ranges) {
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t off = std::get<0>(units_[size_t(u)]);
    char* src = reinterpret_cast<char*>(slots_[size_t(slot(u))]);
    int64_t moved = 0;
    for (const auto& r : ranges) {
      const std::string why = transfer(kv_fd_, true, src + r.first, r.second, off + r.first, kv_direct_);
      if (why.size()) return why;
      moved += r.second;
    }
    std::lock_guard<std::mutex> g(io_m_);
    kv_written_bytes_ += moved;
    kv_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return "";
  }

  static std::string transfer(int fd, bool write, char* buf, int64_t n, int64_t off, bool direct) {
    for (int64_t done = 0; done < n;) {
      ssize_t r = write ? ::pwrite(fd, buf + done, size_t(n - done), off + done)
                        : ::pread(fd, buf + done, size_t(n - done), off + done);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0)
        return std::string(write ? "writing " : "reading ") + std::to_string(n) + " bytes at " + std::to_string(off) +
               ": " + (r < 0 ? std::strerror(errno) : "unexpected end of file");
      done += r;
    }
    if (!direct) {
      if (write) ::fdatasync(fd);   // written pages are dropped only once clean
      ::posix_fadvise(fd, off, n, POSIX_FADV_DONTNEED);
    }
    return "";
  }

  void fail(const std::string& why) {
    std::fprintf(stderr, "ffc: weight stream: %s\n", why.c_str());
    std::abort();   // a kernel cannot throw; the file was checked at load, so this is a disk failure
  }

  void loop() {
    std::unique_lock<std::mutex> g(m_);
    for (;;) {
      // the next unit of the current sequence (cyclically: past its end, the next run's first)
      // whose slot is free, unless it is already there
      cv_.wait(g, [&] {
        if (stop_) return true;
        if (cur_ < 0 || error_.size()) return false;
        const std::vector<int>& s = seqs_[size_t(cur_)];
        for (;;) {
          if (s.empty() || pos_ >= s.size() + slots_.size()) return false;   // ran a ring ahead
          const int u = s[pos_ % s.size()];
          if (kind_[size_t(u)] && pos_ >= s.size()) return false;   // a KV unit of the next run: wait for it
          if (holds_[size_t(slot(u))] != u || free_[size_t(slot(u))]) return bool(free_[size_t(slot(u))]);
          ++pos_;   // present and not yet used: nothing to read
        }
      });
      if (stop_) return;
      const std::vector<int>& s = seqs_[size_t(cur_)];
      const int u = s[pos_ % s.size()];
      ++pos_;
      const size_t k = size_t(slot(u));
      holds_[k] = u, free_[k] = 0, loading_ = true, loading_u_ = u;
      const int flush = pending_[k];        // the KV unit last in this slot, written back first
      std::vector<std::pair<int64_t, int64_t>> flushed, ranges;
      if (flush >= 0) flushed.swap(pending_ranges_[k]);
      pending_[k] = -1;
      if (kind_[size_t(u)]) ranges = kv_read_;
      g.unlock();
      std::string why = flush >= 0 ? write_unit(flush, flushed) : "";
      if (why.empty()) why = read_unit(u, ranges);
      g.lock();
      loading_ = false;
      if (why.size()) error_ = why;
      read_s_ += last_read_s_, ++reads_;
      cv_.notify_all();
    }
  }

  std::vector<std::tuple<int64_t, int64_t, int>> units_;
  std::vector<char> kind_;    // 1: a KV unit (its own file, ranges, written back)
  std::vector<uintptr_t> slots_;
  std::vector<int> holds_;    // the unit each slot holds (or is loading), -1 none
  std::vector<char> free_;    // 1: the slot may be overwritten (its unit was used, or is unwanted)
  std::vector<int> pending_;   // per slot: the KV unit whose writes are still to go to disk, -1 none
  std::vector<std::vector<std::pair<int64_t, int64_t>>> pending_ranges_;
  std::vector<std::pair<int64_t, int64_t>> kv_read_, kv_write_;   // the coming run's KV ranges
  std::vector<std::vector<int>> seqs_;
  std::vector<std::vector<int>> at_;   // per sequence: each unit's place in it, -1 absent
  bool overlap_, direct_ = false, stop_ = false, loading_ = false;
  int loading_u_ = -1, cur_ = -1;
  size_t pos_ = 0;
  int fd_ = -1, kv_fd_ = -1;
  bool kv_direct_ = false;
  std::string error_;
  int64_t bytes_ = 0, reads_ = 0, kv_bytes_ = 0, kv_read_bytes_ = 0, kv_written_bytes_ = 0;
  double read_s_ = 0.0, waited_ = 0.0, last_read_s_ = 0.0, kv_s_ = 0.0;
  std::mutex m_;
  std::mutex io_m_;   // the byte counters the reading thread adds to without m_
  std::condition_variable cv_;
  std::thread reader_;
};

// The steps' kernels: p[0] the streamer, p[1] the sequence or unit (an integer as a pointer).
extern "C" inline void ffc_stream_begin(void* const* p, const int64_t*, int tid, int) {
  if (tid == 0) static_cast<FfcStreamer*>(p[0])->begin(int(reinterpret_cast<intptr_t>(p[1])));
}
extern "C" inline void ffc_stream_wait(void* const* p, const int64_t*, int tid, int) {
  if (tid == 0) static_cast<FfcStreamer*>(p[0])->wait(int(reinterpret_cast<intptr_t>(p[1])));
}
extern "C" inline void ffc_stream_release(void* const* p, const int64_t*, int tid, int) {
  if (tid == 0) static_cast<FfcStreamer*>(p[0])->release(int(reinterpret_cast<intptr_t>(p[1])));
}
