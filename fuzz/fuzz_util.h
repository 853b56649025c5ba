// Shared pieces of the libFuzzer targets in fuzz/: the small jobs they run
// stores for, checksum repair for safetensors inputs, scratch folders and
// invariant failures.

#ifndef TESSERA_FUZZ_FUZZ_UTIL_H_
#define TESSERA_FUZZ_FUZZ_UTIL_H_

#include <unistd.h>
#include <zlib.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/job_spec.h"
#include "proto/tessera.pb.h"

namespace tessera::fuzz {

// An invariant does not hold: print why and abort, which libFuzzer records
// as a crash and saves the input for.
[[noreturn]] inline void Fail(const std::string& what) {
  std::fprintf(stderr, "tessera fuzz invariant violated: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

inline void Check(bool ok, const std::string& what) {
  if (!ok) Fail(what);
}

// The job every store fuzzer uses: linear:8-2 (a 2x8 weight and a 2-bias,
// 18 floats) cut into 16-byte blocks, so five blocks over two shards, Adam
// on the servers (the project's default optimizer). Built through the same
// parse and validation as a job file. Aborts if the job does not validate.
inline tessera::v1::JobSpec SmallJob(tessera::v1::ConsistencyMode mode, int num_workers) {
  const std::string text = absl::StrCat(R"pb(
    name: "fuzz"
    model: "linear:8-2"
    loss: MEAN_SQUARED_ERROR
    data { format: SYNTHETIC_REGRESSION num_samples: 64 validation_fraction: 0.25 }
    optimizer { type: ADAM learning_rate: 0.01 }
    batch_size: 4
    epochs: 1
    num_shards: 2
    block_bytes: 16
    seed: 7
    num_workers: )pb",
                                        num_workers, "\nconsistency { mode: ",
                                        tessera::v1::ConsistencyMode_Name(mode), " }\n");
  absl::StatusOr<tessera::v1::JobSpec> job = ParseJobSpec(text, "fuzz-job");
  if (!job.ok()) Fail(std::string(job.status().message()));
  absl::Status valid = ValidateJobSpec(&*job);
  if (!valid.ok()) Fail(std::string(valid.message()));
  return *std::move(job);
}

// Placeholder for the CRC-32 that safetensors inputs carry in their header.
inline constexpr absl::string_view kCrcPlaceholder = "@CRC@";

// libFuzzer cannot compute checksums, so a mutated safetensors file would
// almost always stop at the CRC check. Inputs may name the checksum as
// kCrcPlaceholder inside the header (`"crc32":"@CRC@"`); it is replaced by
// the CRC-32 of the data section, and the header length fixed to match.
// Anything else (short files, bad lengths, no placeholder) is left as is.
inline std::string RepairChecksum(absl::string_view input) {
  std::string bytes(input);
  if (bytes.size() < 8) return bytes;
  uint64_t header_len;
  std::memcpy(&header_len, bytes.data(), 8);
  if (header_len > bytes.size() - 8) return bytes;
  std::string header = bytes.substr(8, header_len);
  const size_t at = header.find(kCrcPlaceholder.data(), 0, kCrcPlaceholder.size());
  if (at == std::string::npos) return bytes;
  const std::string data = bytes.substr(8 + header_len);
  uLong crc = crc32(0L, Z_NULL, 0);
  crc = crc32(crc, reinterpret_cast<const Bytef*>(data.data()), static_cast<uInt>(data.size()));
  header.replace(at, kCrcPlaceholder.size(), absl::StrCat(static_cast<uint32_t>(crc)));
  const uint64_t new_len = header.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &new_len, 8);
  return out + header + data;
}

// A fresh folder under $TMPDIR (or /tmp), removed with everything in it
// when the object goes away (a function-local static: at exit). Aborts when
// it cannot be made.
class ScratchDir {
 public:
  explicit ScratchDir(const char* tag) {
    const char* tmp = std::getenv("TMPDIR");
    path_ = absl::StrCat(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp", "/tessera-", tag,
                         "-XXXXXX");
    if (mkdtemp(path_.data()) == nullptr) Fail(absl::StrCat("mkdtemp ", path_));
  }
  ~ScratchDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;

  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Replaces the file at `path` with `bytes`; aborts on failure.
inline void WriteFile(const std::string& path, absl::string_view bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) Fail(absl::StrCat("cannot write ", path));
  if (!bytes.empty() && std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size()) {
    Fail(absl::StrCat("short write to ", path));
  }
  std::fclose(f);
}

}  // namespace tessera::fuzz

#endif  // TESSERA_FUZZ_FUZZ_UTIL_H_
