// Reading and writing the safetensors format: an 8-byte little-endian header
// length, a JSON header naming each tensor's dtype, shape and byte range, and
// the raw little-endian tensor bytes. Python's `safetensors` and a few lines
// of NumPy read these files without any Tessera code.

#ifndef TESSERA_COMMON_SAFETENSORS_H_
#define TESSERA_COMMON_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace tessera {

// A float32 tensor to write; `data` must stay valid during the write.
struct TensorToWrite {
  std::string name;
  std::vector<int64_t> shape;
  absl::Span<const float> data;
};

struct LoadedTensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

struct SafetensorsFile {
  std::map<std::string, std::string> metadata;
  std::map<std::string, LoadedTensor> tensors;
};

// Writes `tensors` (F32) and `metadata` to `path` durably: the bytes go to
// `path`.tmp, which is fsynced, renamed over `path`, and the folder fsynced,
// so a crash leaves the old file or the new one, never a torn one. The CRC-32
// of the data section is stored as metadata "crc32". Errors name the path.
absl::Status WriteSafetensorsFile(const std::string& path,
                                  const std::vector<TensorToWrite>& tensors,
                                  const std::map<std::string, std::string>& metadata);

// Reads a file written by WriteSafetensorsFile (F32 tensors only). kNotFound
// when it is missing; kDataLoss naming the path when it is truncated, its
// header is malformed, or the data section's CRC-32 does not match.
absl::StatusOr<SafetensorsFile> ReadSafetensorsFile(const std::string& path);

}  // namespace tessera

#endif  // TESSERA_COMMON_SAFETENSORS_H_
