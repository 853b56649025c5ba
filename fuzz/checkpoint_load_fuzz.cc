// Fuzzes a server's resume path (LoadLatestCheckpoint): the input is one
// shard file, <dir>/step-0000000001/shard-0-of-1.safetensors, loaded for a
// linear:8-2 model with Adam (two slots).
//
// A header may carry its checksum as "@CRC@" (see RepairChecksum), so that
// mutated files get past the CRC check and reach the checkpoint's own
// checks (format, model, optimizer, step, tensor names and ranges, slots).
//
// Invariants: no crash or sanitizer report; an error is kFailedPrecondition
// (another model or optimizer); a file that is not loaded is reported as a
// skipped folder; a loaded model has every parameter, slot and update count
// of the model, from the folder written.

#include <sys/stat.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/model_spec.h"
#include "fuzz/fuzz_util.h"
#include "server/checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using tessera::fuzz::Check;
  static tessera::fuzz::ScratchDir dir("checkpoint-load-fuzz");
  static const tessera::ModelSpec model = [] {
    absl::StatusOr<tessera::ModelSpec> m =
        tessera::ParseModelSpec("linear:8-2", tessera::LossKind::kMeanSquaredError);
    if (!m.ok()) tessera::fuzz::Fail(std::string(m.status().message()));
    return *m;
  }();
  constexpr int kSlots = 2;
  const std::string step_dir = dir.path() + "/step-0000000001";
  static const bool made = [&] {
    Check(mkdir(step_dir.c_str(), 0755) == 0, "mkdir " + step_dir);
    return true;
  }();
  (void)made;
  tessera::fuzz::WriteFile(
      step_dir + "/shard-0-of-1.safetensors",
      tessera::fuzz::RepairChecksum(absl::string_view(reinterpret_cast<const char*>(data), size)));

  tessera::CheckpointInfo expected;
  expected.model = "linear:8-2";
  expected.optimizer_type = "ADAM";
  std::vector<std::string> skipped;
  absl::StatusOr<std::optional<tessera::RestoredModel>> loaded =
      tessera::LoadLatestCheckpoint(dir.path(), expected, model, kSlots, &skipped);
  if (!loaded.ok()) {
    Check(loaded.status().code() == absl::StatusCode::kFailedPrecondition,
          absl::StrCat("load failed with an unexpected code: ", loaded.status().ToString()));
    return 0;
  }
  if (!loaded->has_value()) {
    Check(skipped.size() == 1, absl::StrCat("nothing loaded but ", skipped.size(),
                                            " folders reported skipped"));
    return 0;
  }
  const tessera::RestoredModel& r = **loaded;
  const size_t total = static_cast<size_t>(model.total_params());
  Check(r.params.size() == total, "restored parameters do not match the model");
  Check(r.slots.size() == kSlots, "restored slot count does not match");
  for (const std::vector<float>& s : r.slots) Check(s.size() == total, "restored slot size");
  Check(r.updates.size() == total, "restored update counts do not match the model");
  Check(r.path == step_dir, "restored from an unexpected folder: " + r.path);
  return 0;
}
