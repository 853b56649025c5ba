// Fuzzes the safetensors reader every checkpoint load goes through
// (ReadSafetensorsFile): the input is written to a file and read back.
//
// A header may carry its checksum as "@CRC@" (see RepairChecksum), so that
// mutated files get past the CRC check and reach the tensor checks.
//
// Invariants: no crash or sanitizer report; a refusal is kDataLoss naming
// the file; a file that loads has a "crc32" entry, and every tensor has
// non-negative dimensions whose product (without overflow) is exactly the
// number of floats loaded.

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/safetensors.h"
#include "fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using tessera::fuzz::Check;
  static tessera::fuzz::ScratchDir dir("safetensors-fuzz");
  const std::string path = dir.path() + "/input.safetensors";
  tessera::fuzz::WriteFile(
      path, tessera::fuzz::RepairChecksum(
                absl::string_view(reinterpret_cast<const char*>(data), size)));

  absl::StatusOr<tessera::SafetensorsFile> file = tessera::ReadSafetensorsFile(path);
  if (!file.ok()) {
    Check(file.status().code() == absl::StatusCode::kDataLoss,
          absl::StrCat("refused with an unexpected code: ", file.status().ToString()));
    Check(absl::StrContains(file.status().message(), path),
          absl::StrCat("refusal does not name the file: ", file.status().ToString()));
    return 0;
  }
  Check(file->metadata.count("crc32") == 1, "loaded a file without a checksum");
  for (const auto& [name, tensor] : file->tensors) {
    int64_t elements = 1;
    for (int64_t d : tensor.shape) {
      Check(d >= 0, absl::StrCat("tensor ", name, " loaded with dimension ", d));
      Check(!__builtin_mul_overflow(elements, d, &elements),
            absl::StrCat("tensor ", name, " loaded with a shape whose size overflows"));
    }
    Check(elements == static_cast<int64_t>(tensor.data.size()),
          absl::StrCat("tensor ", name, " has shape of ", elements, " elements but ",
                       tensor.data.size(), " loaded"));
  }
  return 0;
}
