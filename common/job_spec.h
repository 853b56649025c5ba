// Loading, validating and hashing the job description (tessera.v1.JobSpec).

#ifndef TESSERA_COMMON_JOB_SPEC_H_
#define TESSERA_COMMON_JOB_SPEC_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "proto/tessera.pb.h"

namespace tessera {

// Single-field overrides given on a command line. Unset fields leave the
// job file's value alone.
struct JobOverrides {
  std::optional<int32_t> epochs;
  std::optional<int32_t> batch_size;
  std::optional<int32_t> num_workers;
  std::optional<int32_t> num_shards;
  std::optional<std::string> mode;  // "sync", "async" or "ssp"
  std::optional<int32_t> staleness;
  std::optional<int32_t> backup_workers;
  std::optional<double> learning_rate;
  std::optional<uint64_t> seed;
  std::optional<int64_t> max_steps;
  std::optional<std::string> checkpoint_dir;
  std::optional<int64_t> checkpoint_every_steps;
  std::optional<int64_t> checkpoint_every_seconds;
  std::optional<std::string> wire_dtype;  // "f32" or "bf16"
  std::optional<double> top_k_fraction;
  std::optional<bool> overlap;
};

// Parses text-format `text`; `source` names it in errors ("job.textproto:3:5:
// Message type "tessera.v1.JobSpec" has no field named "epoch"").
// Does not validate.
absl::StatusOr<tessera::v1::JobSpec> ParseJobSpec(absl::string_view text,
                                                  absl::string_view source);

// Reads and parses the file at `path` (kNotFound when it is missing).
absl::StatusOr<tessera::v1::JobSpec> ReadJobSpecFile(const std::string& path);

// Applies `overrides` to `job`. kInvalidArgument for an unknown mode name.
absl::Status ApplyOverrides(const JobOverrides& overrides,
                            tessera::v1::JobSpec* job);

// Fills defaults (block_bytes, barrier timeout, ...) and checks every field.
// Errors name the field: "job.batch_size: must be positive, got 0".
absl::Status ValidateJobSpec(tessera::v1::JobSpec* job);

// Reads the file, applies the overrides and validates: what every process
// does at start-up. Errors are prefixed with the file name.
absl::StatusOr<tessera::v1::JobSpec> LoadJob(const std::string& path,
                                             const JobOverrides& overrides);

// Hash of the validated job's deterministic serialisation, leaving out the
// servers-only checkpoint policy; equal on every process that read the same
// file with the same overrides.
uint64_t JobHash(const tessera::v1::JobSpec& job);

// "sync" / "async" / "ssp" for a mode.
std::string ModeName(tessera::v1::ConsistencyMode mode);

}  // namespace tessera

#endif  // TESSERA_COMMON_JOB_SPEC_H_
