#include "common/flags.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <optional>
#include <string_view>

#include "absl/flags/flag.h"
#include "absl/flags/internal/program_name.h"
#include "absl/flags/internal/usage.h"
#include "absl/flags/marshalling.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

ABSL_FLAG(std::string, job, "", "Job file (protobuf text format, tessera.v1.JobSpec).");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA certificate. Clients: verify the server with it. Servers: "
          "require client certificates signed by it (mutual TLS).");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain of this process (servers: enables TLS; "
          "clients: the client certificate for mutual TLS).");
ABSL_FLAG(std::string, tls_key, "", "PEM private key for --tls_cert.");
ABSL_FLAG(std::string, token_file, "",
          "File holding the bearer token every call must carry (needs TLS).");
ABSL_FLAG(std::string, admin_token_file, "",
          "File holding the bearer token for admin calls such as checkpoint "
          "(servers: accept it; tessera checkpoint: send it).");
ABSL_FLAG(std::optional<int32_t>, tcp_rto_min_us, std::nullopt,
          "Floor of the TCP retransmission timeout on this process's gRPC sockets, in "
          "microseconds (default 5000; the kernel rounds up to whole clock ticks: 8 ms at "
          "HZ=250). 0 keeps the system's floor (200 ms unless net.ipv4.tcp_rto_min_us says "
          "otherwise). "
          "Needs Linux 6.15 or later; older kernels keep the system's floor with a warning.");
ABSL_FLAG(std::string, tcp_congestion, "",
          "TCP congestion-control algorithm for this process's gRPC sockets, for example "
          "bbr, which keeps a link with random packet loss busier than cubic does (and "
          "on loopback is slower). Empty keeps the system's "
          "(net.ipv4.tcp_congestion_control), except on connections between loopback "
          "addresses, which use cubic. An algorithm this kernel does not offer to this "
          "process is an error.");
ABSL_FLAG(bool, shared_memory, true,
          "Same-host fast path: workers offer servers on this host (loopback or unix: "
          "addresses) a shared-memory region for tensor payloads, and servers accept it. "
          "--noshared_memory keeps every payload on the gRPC stream.");
ABSL_FLAG(bool, layerwise_push, false,
          "Workers: push each shard as soon as backward has produced the gradients of "
          "every parameter it holds (last layer first) while the rest of backward goes "
          "on, instead of after the whole backward. Same bytes, same results. On the gRPC "
          "stream each parameter's blocks leave as a part of their own as soon as they "
          "are ready; through shared memory (same host) a shard leaves once all of its "
          "parameters are. Not used with --overlap.");
ABSL_FLAG(std::optional<int64_t>, stream_part_bytes, std::nullopt,
          "Workers: pushes and pulled parameters on the gRPC stream (no shared memory) "
          "travel in parts of whole blocks of at least this many bytes, so that one "
          "end works on a part while the next is on its way (default 4194304; 0: one "
          "message each).");
ABSL_FLAG(std::optional<int32_t>, epochs, std::nullopt, "Override job.epochs.");
ABSL_FLAG(std::optional<int32_t>, batch_size, std::nullopt,
          "Override job.batch_size (samples per worker per step).");
ABSL_FLAG(std::optional<int32_t>, num_workers, std::nullopt, "Override job.num_workers.");
ABSL_FLAG(std::optional<int32_t>, num_shards, std::nullopt, "Override job.num_shards.");
ABSL_FLAG(std::optional<std::string>, mode, std::nullopt,
          "Override job.consistency.mode: sync, async or ssp.");
ABSL_FLAG(std::optional<int32_t>, staleness, std::nullopt,
          "Override job.consistency.staleness (ssp).");
ABSL_FLAG(std::optional<int32_t>, backup_workers, std::nullopt,
          "Override job.consistency.backup_workers (sync: a step applies once "
          "num_workers - backup_workers gradients arrived; later ones are dropped "
          "and counted as late).");
ABSL_FLAG(std::optional<double>, learning_rate, std::nullopt,
          "Override job.optimizer.learning_rate.");
ABSL_FLAG(std::optional<uint64_t>, seed, std::nullopt, "Override job.seed.");
ABSL_FLAG(std::optional<int64_t>, max_steps, std::nullopt,
          "Override job.max_steps (stop after this many steps).");
ABSL_FLAG(std::optional<std::string>, checkpoint_dir, std::nullopt,
          "Override job.checkpoint.dir (servers write and resume checkpoints there).");
ABSL_FLAG(std::optional<int64_t>, checkpoint_every_steps, std::nullopt,
          "Override job.checkpoint.every_steps.");
ABSL_FLAG(std::optional<int64_t>, checkpoint_every_seconds, std::nullopt,
          "Override job.checkpoint.every_seconds.");
ABSL_FLAG(std::optional<double>, top_k_fraction, std::nullopt,
          "Override job.top_k_fraction (top-k sparsified pushes with error feedback; 0: dense).");
// A plain bool so that a bare --overlap works; it overrides the job only
// when given (see OverlapOverride).
ABSL_FLAG(bool, overlap, false,
          "Override job.overlap (ASYNC/SSP: compute the next gradient while the previous "
          "push and pull travel).");
ABSL_FLAG(std::optional<std::string>, wire_dtype, std::nullopt,
          "Override job.wire_dtype: f32, or bf16 or f16 to halve the bytes on the wire.");

namespace tessera {
namespace {

bool OurFlagsFile(absl::string_view path) {
  return absl::StrContains(path, "_main.cc") || absl::StrContains(path, "common/flags.cc");
}

template <typename T>
void Forward(const absl::Flag<std::optional<T>>& flag, const char* name,
             std::vector<std::string>* out) {
  const std::optional<T> v = absl::GetFlag(flag);
  if (v.has_value()) out->push_back(absl::StrCat("--", name, "=", absl::UnparseFlag(*v)));
}

// Whether argv named --overlap (any of --overlap, --overlap=V, --nooverlap,
// with one or two dashes); set by ParseFlagsOrExit. This Abseil does not
// expose whether a flag was set, and a bool flag cannot be optional<bool>
// without losing the bare form.
bool overlap_given = false;

bool NamesOverlap(absl::string_view arg) {
  if (!absl::ConsumePrefix(&arg, "--")) absl::ConsumePrefix(&arg, "-");
  return arg == "overlap" || arg == "nooverlap" || absl::StartsWith(arg, "overlap=");
}

// --overlap when it was given on the command line, nullopt otherwise.
std::optional<bool> OverlapOverride() {
  return overlap_given ? std::optional<bool>(absl::GetFlag(FLAGS_overlap)) : std::nullopt;
}

}  // namespace

std::vector<char*> ParseFlagsOrExit(int argc, char** argv, const char* usage) {
  for (int i = 1; i < argc; ++i) {
    if (std::string_view(argv[i]) == "--") break;
    overlap_given |= NamesOverlap(argv[i]);
  }
  absl::SetProgramUsageMessage(usage);
  absl::FlagsUsageConfig config;
  config.contains_help_flags = OurFlagsFile;
  config.contains_helpshort_flags = OurFlagsFile;
  absl::SetFlagsUsageConfig(config);
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--") break;
    if (arg == "--help" || arg == "-help" || arg == "-h") {
      // Abseil's own --help exits 1; people and scripts expect 0. FlagsHelp
      // starts with "PROGRAM: " (the name ParseCommandLine would have set),
      // which the usage texts already begin with.
      absl::flags_internal::SetProgramInvocationName(argv[0]);
      absl::string_view text = usage;
      absl::ConsumePrefix(
          &text, absl::StrCat(absl::flags_internal::ShortProgramInvocationName(), ": "));
      absl::flags_internal::FlagsHelp(std::cout, "_main.cc",
                                      absl::flags_internal::HelpFormat::kHumanReadable, text);
      absl::flags_internal::FlagsHelp(std::cout, "common/flags.cc",
                                      absl::flags_internal::HelpFormat::kHumanReadable,
                                      "flags that override the job file:");
      std::exit(0);
    }
  }
  return absl::ParseCommandLine(argc, argv);
}

std::string JobFlag() { return absl::GetFlag(FLAGS_job); }

bool WritePortFile(const std::string& path, int port) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    out << port << "\n";
    if (!out.good()) return false;
  }
  return std::rename(tmp.c_str(), path.c_str()) == 0;
}

JobOverrides JobOverridesFromFlags() {
  JobOverrides o;
  o.epochs = absl::GetFlag(FLAGS_epochs);
  o.batch_size = absl::GetFlag(FLAGS_batch_size);
  o.num_workers = absl::GetFlag(FLAGS_num_workers);
  o.num_shards = absl::GetFlag(FLAGS_num_shards);
  o.mode = absl::GetFlag(FLAGS_mode);
  o.staleness = absl::GetFlag(FLAGS_staleness);
  o.backup_workers = absl::GetFlag(FLAGS_backup_workers);
  o.learning_rate = absl::GetFlag(FLAGS_learning_rate);
  o.seed = absl::GetFlag(FLAGS_seed);
  o.max_steps = absl::GetFlag(FLAGS_max_steps);
  o.checkpoint_dir = absl::GetFlag(FLAGS_checkpoint_dir);
  o.checkpoint_every_steps = absl::GetFlag(FLAGS_checkpoint_every_steps);
  o.checkpoint_every_seconds = absl::GetFlag(FLAGS_checkpoint_every_seconds);
  o.wire_dtype = absl::GetFlag(FLAGS_wire_dtype);
  o.top_k_fraction = absl::GetFlag(FLAGS_top_k_fraction);
  o.overlap = OverlapOverride();
  return o;
}

SecurityFiles SecurityFilesFromFlags() {
  SecurityFiles f;
  f.ca = absl::GetFlag(FLAGS_tls_ca);
  f.cert = absl::GetFlag(FLAGS_tls_cert);
  f.key = absl::GetFlag(FLAGS_tls_key);
  f.token = absl::GetFlag(FLAGS_token_file);
  f.admin_token = absl::GetFlag(FLAGS_admin_token_file);
  return f;
}

absl::StatusOr<SocketTuning> SocketTuningFromFlags() {
  SocketTuning tuning;
  tuning.tcp_rto_min_us = absl::GetFlag(FLAGS_tcp_rto_min_us).value_or(kDefaultTcpRtoMinUs);
  tuning.tcp_congestion = absl::GetFlag(FLAGS_tcp_congestion);
  std::string no_floor;
  absl::StatusOr<SocketTuning> resolved = ResolveSocketTuning(std::move(tuning), &no_floor);
  // Only worth a line when the user asked for the floor by name.
  if (!no_floor.empty() && absl::GetFlag(FLAGS_tcp_rto_min_us).has_value()) {
    std::cerr << "warning: " << no_floor << std::endl;
  }
  return resolved;
}

bool SharedMemoryFromFlags() { return absl::GetFlag(FLAGS_shared_memory); }

bool LayerwisePushFromFlags() { return absl::GetFlag(FLAGS_layerwise_push); }

absl::StatusOr<int64_t> StreamPartBytesFromFlags(int64_t default_bytes) {
  const int64_t v = absl::GetFlag(FLAGS_stream_part_bytes).value_or(default_bytes);
  if (v < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--stream_part_bytes: must be 0 (one message) or positive, got ", v));
  }
  return v;
}

std::vector<std::string> ForwardedSecurityFlags() {
  std::vector<std::string> out;
  const SecurityFiles f = SecurityFilesFromFlags();
  const std::pair<const char*, const std::string*> flags[] = {
      {"tls_ca", &f.ca}, {"tls_cert", &f.cert}, {"tls_key", &f.key},
      {"token_file", &f.token}, {"admin_token_file", &f.admin_token}};
  for (const auto& [name, value] : flags) {
    if (!value->empty()) out.push_back(absl::StrCat("--", name, "=", *value));
  }
  return out;
}

std::vector<std::string> ForwardedJobFlags() {
  std::vector<std::string> out;
  Forward(FLAGS_epochs, "epochs", &out);
  Forward(FLAGS_batch_size, "batch_size", &out);
  Forward(FLAGS_num_workers, "num_workers", &out);
  Forward(FLAGS_num_shards, "num_shards", &out);
  Forward(FLAGS_mode, "mode", &out);
  Forward(FLAGS_staleness, "staleness", &out);
  Forward(FLAGS_backup_workers, "backup_workers", &out);
  Forward(FLAGS_learning_rate, "learning_rate", &out);
  Forward(FLAGS_seed, "seed", &out);
  Forward(FLAGS_max_steps, "max_steps", &out);
  Forward(FLAGS_checkpoint_dir, "checkpoint_dir", &out);
  Forward(FLAGS_checkpoint_every_steps, "checkpoint_every_steps", &out);
  Forward(FLAGS_checkpoint_every_seconds, "checkpoint_every_seconds", &out);
  Forward(FLAGS_wire_dtype, "wire_dtype", &out);
  Forward(FLAGS_top_k_fraction, "top_k_fraction", &out);
  Forward(FLAGS_tcp_rto_min_us, "tcp_rto_min_us", &out);
  if (const std::string cc = absl::GetFlag(FLAGS_tcp_congestion); !cc.empty()) {
    out.push_back(absl::StrCat("--tcp_congestion=", cc));
  }
  Forward(FLAGS_stream_part_bytes, "stream_part_bytes", &out);
  if (!absl::GetFlag(FLAGS_shared_memory)) out.push_back("--shared_memory=false");
  if (absl::GetFlag(FLAGS_layerwise_push)) out.push_back("--layerwise_push=true");
  if (const std::optional<bool> v = OverlapOverride()) {
    out.push_back(absl::StrCat("--overlap=", *v ? "true" : "false"));
  }
  return out;
}

}  // namespace tessera
