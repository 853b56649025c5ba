// Apply benchmark: server/optimizer.h's Optimizer::Apply over 64 MiB of
// parameters (one core), beside memcpy of 64 MiB measured in the same run.
//
// Bytes counted per element (reads + writes of 4-byte floats):
//   SGD       12  (read p, read g, write p)
//   MOMENTUM  20  (read p, g, b; write p, b)
//   ADAM      28  (read p, g, m, v; write p, m, v)
//   ADAMW     28  (as ADAM)
//   ADAGRAD   20  (read p, g, a; write p, a)
// memcpy of S bytes is counted as 2 S (S read + S written), so the ratio
// compares like with like: bytes moved per second. Write-allocate traffic
// (a store to a line not in cache first reads it, unless the copy uses
// non-temporal stores, as glibc's memcpy does for large sizes) is not
// counted on either side.
//
// The push path also decodes and validates each gradient before Apply; the
// bench times those passes (DecodeF32 into a float buffer, AllFinite) over
// the same 64 MiB, counted as 8 and 4 bytes per element.
//
// With --threads=N > 1 (default: the server's --apply_threads default on
// this machine), SGD and Adam run again over the same 64 MiB cut into 4 MiB
// blocks shared by N threads (server/apply_pool.h), as a server shares a
// large step's blocks; rows "sgd_xN" and "adam_xN", still against one-core
// memcpy.
//
// Output: one JSON document (stdout, or --out); a table on stderr.
//
// Usage: apply_bench [--mib=64] [--reps=20] [--threads=N] [--out=FILE]

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/aligned_buffer.h"
#include "common/tensor_codec.h"
#include "server/apply_pool.h"
#include "server/optimizer.h"

ABSL_FLAG(int64_t, mib, 64, "Parameter bytes per Apply, in MiB.");
ABSL_FLAG(int32_t, reps, 20, "Timed repetitions; the median is reported.");
ABSL_FLAG(int32_t, threads, -1,
          "Threads for the sgd_xN and adam_xN rows (1: none; default: "
          "tessera-server's default --apply_threads here).");
ABSL_FLAG(std::string, out, "", "Write the JSON document here (default: stdout).");

namespace tessera {
namespace {

using Clock = std::chrono::steady_clock;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

template <typename Fn>
std::vector<double> Time(int reps, Fn&& fn) {
  fn();  // warm-up: page faults, caches, frequency
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const auto a = Clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(Clock::now() - a).count());
  }
  return t;
}

struct Row {
  std::string name;
  int bytes_per_element;
  std::vector<double> seconds;
};

int Main() {
  const int64_t n = absl::GetFlag(FLAGS_mib) * 262144;
  const int reps = std::max(3, absl::GetFlag(FLAGS_reps));
  const int64_t bytes = n * 4;

  // Small gradients keep every optimizer's parameters finite and non-denormal
  // over thousands of applies.
  AlignedBuffer params(n, 0.5f), grad(n, 1e-4f), slot0(n, 0.0f), slot1(n, 0.0f);
  AlignedBuffer src(n, 1.0f), dst(n, 2.0f);

  if (absl::GetFlag(FLAGS_threads) == 0 || absl::GetFlag(FLAGS_threads) < -1) {
    std::cerr << "apply_bench: --threads=" << absl::GetFlag(FLAGS_threads)
              << ": must be at least 1 (or -1, the server's default)\n";
    return 1;
  }
  const int threads = absl::GetFlag(FLAGS_threads) < 0 ? DefaultApplyThreads()
                                                       : absl::GetFlag(FLAGS_threads);
  ApplyPool pool(threads);

  std::vector<Row> rows;
  rows.push_back({"memcpy", 8, Time(reps, [&] {
                    std::memcpy(dst.data(), src.data(), bytes);
                    asm volatile("" : : "r"(dst.data()) : "memory");
                  })});

  struct Case {
    const char* name;
    tessera::v1::OptimizerType type;
    int bytes_per_element;
  };
  const Case cases[] = {
      {"sgd", tessera::v1::SGD, 12},         {"momentum", tessera::v1::MOMENTUM, 20},
      {"nesterov", tessera::v1::MOMENTUM, 20}, {"adam", tessera::v1::ADAM, 28},
      {"adamw", tessera::v1::ADAMW, 28},     {"adagrad", tessera::v1::ADAGRAD, 20},
  };
  for (const Case& c : cases) {
    tessera::v1::OptimizerSpec spec;
    spec.set_type(c.type);
    spec.set_learning_rate(1e-3);
    if (c.type == tessera::v1::MOMENTUM) spec.set_momentum(0.9);
    if (std::string(c.name) == "nesterov") spec.set_nesterov(true);
    if (c.type == tessera::v1::ADAMW) spec.set_weight_decay(0.01);
    absl::StatusOr<std::unique_ptr<Optimizer>> opt = Optimizer::Create(spec);
    if (!opt.ok()) {
      std::cerr << "apply_bench: " << c.name << ": " << opt.status() << "\n";
      return 1;
    }
    std::fill_n(slot0.data(), n, (*opt)->SlotInitialValue(0));
    std::fill_n(slot1.data(), n, (*opt)->SlotInitialValue(1));
    float* slots[2] = {slot0.data(), slot1.data()};
    int64_t count = 0;
    const float lr = static_cast<float>((*opt)->LearningRate(0));
    rows.push_back({c.name, c.bytes_per_element, Time(reps, [&] {
                      (*opt)->Apply(++count, lr, params.data(), grad.data(), slots, n);
                    })});
    if (threads > 1 && (c.type == tessera::v1::SGD || c.type == tessera::v1::ADAM)) {
      // 4 MiB blocks, each applied whole by one thread.
      constexpr int64_t kBlock = 1 << 20;  // elements
      const int blocks = static_cast<int>((n + kBlock - 1) / kBlock);
      rows.push_back({absl::StrCat(c.name, "_x", threads), c.bytes_per_element,
                      Time(reps, [&] {
                        ++count;
                        pool.Run(blocks, [&](int b) {
                          const int64_t at = b * kBlock;
                          float* block_slots[2] = {slot0.data() + at, slot1.data() + at};
                          (*opt)->Apply(count, lr, params.data() + at, grad.data() + at,
                                        block_slots, std::min(kBlock, n - at));
                        });
                      })});
    }
  }

  // The other passes a push makes over its payload.
  std::string payload(reinterpret_cast<const char*>(grad.data()), bytes);
  rows.push_back({"decode_f32", 8, Time(reps, [&] {
                    if (!DecodeF32(tessera::v1::F32, payload, dst.span()).ok()) std::abort();
                  })});
  rows.push_back({"all_finite", 4, Time(reps, [&] {
                    if (!AllFinite(grad.span())) std::abort();
                  })});

  const double memcpy_gbps = 2.0 * bytes / Median(rows[0].seconds) / 1e9;
  std::vector<std::string> json_rows;
  std::cerr << absl::StrFormat("%-10s %10s %12s %10s %8s\n", "kernel", "ms", "bytes/elem",
                               "GB/s", "x memcpy");
  for (const Row& r : rows) {
    const double t = Median(r.seconds);
    const double gbps = static_cast<double>(r.bytes_per_element) * n / t / 1e9;
    const double ratio = gbps / memcpy_gbps;
    std::cerr << absl::StrFormat("%-10s %10.2f %12d %10.2f %8.2f\n", r.name, t * 1e3,
                                 r.bytes_per_element, gbps, ratio);
    json_rows.push_back(absl::StrFormat(
        "{\"kernel\": \"%s\", \"bytes_per_element\": %d, \"ms_median\": %.4f, \"ms_min\": %.4f, "
        "\"ms_max\": %.4f, \"gbps\": %.4f, \"ratio_to_memcpy\": %.4f}",
        r.name, r.bytes_per_element, t * 1e3,
        1e3 * *std::min_element(r.seconds.begin(), r.seconds.end()),
        1e3 * *std::max_element(r.seconds.begin(), r.seconds.end()), gbps, ratio));
  }
  double load[3] = {0, 0, 0};
  getloadavg(load, 3);
  const std::string doc = absl::StrCat(
      "{\"benchmark\": \"apply\", \"parameter_bytes\": ", bytes, ", \"elements\": ", n,
      ", \"reps\": ", reps, ", \"threads\": ", threads,
      ", \"memcpy_bytes_counted\": \"2x size (read + write)\", \"memcpy_gbps\": ",
      absl::StrFormat("%.4f", memcpy_gbps),
      ", \"load_average_end\": [", absl::StrFormat("%.2f, %.2f, %.2f", load[0], load[1], load[2]),
      "], \"kernels\": [\n  ", absl::StrJoin(json_rows, ",\n  "), "\n]}\n");
  const std::string out = absl::GetFlag(FLAGS_out);
  if (out.empty()) {
    std::cout << doc;
  } else {
    std::ofstream f(out, std::ios::binary);
    f << doc;
    if (!f.good()) {
      std::cerr << "apply_bench: cannot write " << out << "\n";
      return 1;
    }
  }
  return 0;
}

}  // namespace
}  // namespace tessera

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Optimizer::Apply bandwidth over 64 MiB of parameters beside memcpy. Prints JSON.");
  absl::ParseCommandLine(argc, argv);
  return tessera::Main();
}
