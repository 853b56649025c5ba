#include "server/checkpoint.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "common/safetensors.h"
#include "common/status_macros.h"

namespace tessera {
namespace {

constexpr char kFormat[] = "tessera-checkpoint-v1";

std::string StepDirName(int64_t step) { return absl::StrFormat("step-%010d", step); }

std::string ShardFileName(int shard, int num_shards) {
  return absl::StrCat("shard-", shard, "-of-", num_shards, ".safetensors");
}

std::string TensorName(const ModelSpec& model, const BlockInfo& b) {
  return absl::StrCat(model.params[b.param_index].name, "@", b.param_offset);
}

absl::Status MakeDir(const std::string& path) {
  if (mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) {
    return absl::InternalError(absl::StrCat("cannot create folder '", path, "': ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

// Step folders in `dir`, newest first.
std::vector<int64_t> ListSteps(const std::string& dir) {
  std::vector<int64_t> steps;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return steps;
  while (dirent* e = readdir(d)) {
    absl::string_view name = e->d_name;
    int64_t step;
    if (absl::ConsumePrefix(&name, "step-") && absl::SimpleAtoi(name, &step)) steps.push_back(step);
  }
  closedir(d);
  std::sort(steps.rbegin(), steps.rend());
  return steps;
}

std::vector<std::string> ListFiles(const std::string& dir) {
  std::vector<std::string> files;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return files;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] != '.') files.push_back(e->d_name);
  }
  closedir(d);
  return files;
}

// The shard count of the checkpoint in `step_dir` (from any file's name).
std::optional<int> ShardCount(const std::string& step_dir) {
  for (const std::string& f : ListFiles(step_dir)) {
    absl::string_view name = f;
    if (!absl::ConsumePrefix(&name, "shard-") || !absl::ConsumeSuffix(&name, ".safetensors")) {
      continue;
    }
    const size_t of = name.find("-of-");
    int n;
    if (of != absl::string_view::npos && absl::SimpleAtoi(name.substr(of + 4), &n) && n > 0) {
      return n;
    }
  }
  return std::nullopt;
}

// Reads a whole step folder into `out`; with `only_shard` >= 0, only that
// shard's file (of expected.num_shards), leaving the other elements zero.
absl::Status ReadStep(const std::string& step_dir, const CheckpointInfo& expected,
                      const ModelSpec& model, int num_slots, int only_shard,
                      RestoredModel* out) {
  std::optional<int> shards =
      only_shard >= 0 ? std::optional<int>(expected.num_shards) : ShardCount(step_dir);
  if (!shards) return absl::DataLossError("no shard files");
  const std::vector<int64_t> offsets = model.param_offsets();
  const int64_t total = model.total_params();
  out->params.assign(total, 0.0f);
  out->slots.assign(num_slots, std::vector<float>(total, 0.0f));
  out->updates.assign(total, 0);
  std::vector<bool> covered(total, false);
  bool first = true;
  for (int s = 0; s < *shards; ++s) {
    if (only_shard >= 0 && s != only_shard) continue;
    const std::string path = absl::StrCat(step_dir, "/", ShardFileName(s, *shards));
    TESSERA_ASSIGN_OR_RETURN(SafetensorsFile file, ReadSafetensorsFile(path));
    const auto meta = [&](const std::string& key) -> std::string {
      auto it = file.metadata.find(key);
      return it == file.metadata.end() ? "" : it->second;
    };
    if (meta("format") != kFormat) {
      return absl::DataLossError(absl::StrCat(path, ": not a Tessera checkpoint"));
    }
    if (meta("model") != expected.model) {
      return absl::FailedPreconditionError(absl::StrCat(
          path, " holds model '", meta("model"), "', the job has '", expected.model, "'"));
    }
    if (meta("optimizer") != expected.optimizer_type) {
      return absl::FailedPreconditionError(absl::StrCat(path, " holds ", meta("optimizer"),
                                                        " state, the job uses ",
                                                        expected.optimizer_type));
    }
    int64_t step = 0, version = 0;
    if (!absl::SimpleAtoi(meta("step"), &step) || !absl::SimpleAtoi(meta("version"), &version)) {
      return absl::DataLossError(absl::StrCat(path, ": bad step metadata"));
    }
    if (first) {
      out->step = step;
      out->version = version;
      first = false;
    } else if (step != out->step) {
      return absl::DataLossError(absl::StrCat(path, ": step ", step, " differs from shard 0's ",
                                              out->step));
    }
    out->version = std::max(out->version, version);
    for (const auto& [name, tensor] : file.tensors) {
      const size_t at = name.rfind('@');
      if (at == std::string::npos || absl::StrContains(name, "/")) continue;  // slots below
      int64_t offset;
      // A named copy: clang before 16 cannot capture a structured binding.
      const std::string param_name = name.substr(0, at);
      auto p = std::find_if(model.params.begin(), model.params.end(),
                            [&](const ParamSpec& ps) { return ps.name == param_name; });
      if (p == model.params.end() || !absl::SimpleAtoi(name.substr(at + 1), &offset) ||
          // Subtract rather than add: a corrupt offset near INT64_MAX must not wrap.
          offset < 0 || offset > p->num_elements() - static_cast<int64_t>(tensor.data.size())) {
        return absl::DataLossError(absl::StrCat(path, ": tensor ", name, " does not fit the model"));
      }
      const int64_t base = offsets[p - model.params.begin()] + offset;
      std::copy(tensor.data.begin(), tensor.data.end(), out->params.begin() + base);
      // Written for every tensor: absent or unreadable means a damaged file.
      int64_t updates = 0;
      if (!absl::SimpleAtoi(meta(absl::StrCat("updates/", name)), &updates) || updates < 0) {
        return absl::DataLossError(
            absl::StrCat(path, ": bad metadata updates/", name, " (update count)"));
      }
      for (int k = 0; k < num_slots; ++k) {
        auto slot = file.tensors.find(absl::StrCat(name, "/slot", k));
        if (slot == file.tensors.end() || slot->second.data.size() != tensor.data.size()) {
          return absl::DataLossError(absl::StrCat(path, ": slot ", k, " of ", name, " is missing"));
        }
        std::copy(slot->second.data.begin(), slot->second.data.end(),
                  out->slots[k].begin() + base);
      }
      for (size_t i = 0; i < tensor.data.size(); ++i) {
        out->updates[base + i] = updates;
        covered[base + i] = true;
      }
    }
  }
  if (only_shard < 0 && std::find(covered.begin(), covered.end(), false) != covered.end()) {
    return absl::DataLossError("the shard files do not cover every parameter");
  }
  out->path = step_dir;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> WriteShardCheckpoint(const std::string& dir,
                                                 const CheckpointInfo& info,
                                                 const ModelSpec& model,
                                                 const ShardState& state, int keep) {
  TESSERA_RETURN_IF_ERROR(MakeDir(dir));
  const std::string step_dir = absl::StrCat(dir, "/", StepDirName(state.step));
  TESSERA_RETURN_IF_ERROR(MakeDir(step_dir));
  std::vector<TensorToWrite> tensors;
  std::map<std::string, std::string> metadata = {
      {"format", kFormat},
      {"job", info.job_name},
      {"model", info.model},
      {"optimizer", info.optimizer_type},
      {"step", absl::StrCat(state.step)},
      {"version", absl::StrCat(state.version)},
      {"shard", absl::StrCat(info.shard)},
      {"num_shards", absl::StrCat(info.num_shards)},
  };
  for (const ParamSpec& p : model.params) {
    std::string shape;
    for (size_t i = 0; i < p.shape.size(); ++i) absl::StrAppend(&shape, i ? "," : "", p.shape[i]);
    metadata[absl::StrCat("shape/", p.name)] = shape;
  }
  for (const BlockState& b : state.blocks) {
    const std::string name = TensorName(model, b.info);
    tensors.push_back({name, {b.info.num_elements}, b.params});
    for (size_t k = 0; k < b.slots.size(); ++k) {
      tensors.push_back({absl::StrCat(name, "/slot", k), {b.info.num_elements}, b.slots[k]});
    }
    metadata[absl::StrCat("updates/", name)] = absl::StrCat(b.updates);
  }
  const std::string path = absl::StrCat(step_dir, "/", ShardFileName(info.shard, info.num_shards));
  TESSERA_RETURN_IF_ERROR(WriteSafetensorsFile(path, tensors, metadata));
  // Verify before deleting anything older.
  TESSERA_RETURN_IF_ERROR(ReadSafetensorsFile(path).status());
  const std::vector<int64_t> steps = ListSteps(dir);
  for (size_t i = std::max(keep, 1); i < steps.size(); ++i) {
    if (steps[i] == state.step) continue;
    const std::string old = absl::StrCat(dir, "/", StepDirName(steps[i]));
    for (const std::string& f : ListFiles(old)) {
      if (absl::StartsWith(f, absl::StrCat("shard-", info.shard, "-of-"))) {
        unlink(absl::StrCat(old, "/", f).c_str());
      }
    }
    rmdir(old.c_str());  // succeeds once every shard has cleaned up
  }
  return path;
}

int RemoveStaleTemporaries(const std::string& dir, int shard) {
  int removed = 0;
  const std::string mine = absl::StrCat("shard-", shard, "-of-");
  for (int64_t step : ListSteps(dir)) {
    const std::string step_dir = absl::StrCat(dir, "/", StepDirName(step));
    for (const std::string& f : ListFiles(step_dir)) {
      if (absl::StartsWith(f, mine) && absl::EndsWith(f, ".safetensors.tmp") &&
          unlink(absl::StrCat(step_dir, "/", f).c_str()) == 0) {
        ++removed;
      }
    }
  }
  return removed;
}

namespace {

// The newest step folder in `dir` that reads cleanly, newest first. With
// `own_file_suffices`, a folder holding this shard's own file at the same
// shard count is read from that file alone.
absl::StatusOr<std::optional<RestoredModel>> LoadNewest(
    const std::string& dir, const CheckpointInfo& expected, const ModelSpec& model,
    int num_slots, bool own_file_suffices, std::vector<std::string>* skipped) {
  for (int64_t step : ListSteps(dir)) {
    const std::string step_dir = absl::StrCat(dir, "/", StepDirName(step));
    const bool own_only =
        own_file_suffices &&
        access(absl::StrCat(step_dir, "/", ShardFileName(expected.shard, expected.num_shards))
                   .c_str(),
               F_OK) == 0;
    RestoredModel restored;
    absl::Status s = ReadStep(step_dir, expected, model, num_slots,
                              own_only ? expected.shard : -1, &restored);
    if (s.ok()) {
      restored.own_file_only = own_only;
      return std::optional<RestoredModel>(std::move(restored));
    }
    if (s.code() == absl::StatusCode::kFailedPrecondition) return s;
    if (skipped != nullptr) skipped->push_back(absl::StrCat(step_dir, ": ", s.message()));
  }
  return std::optional<RestoredModel>();
}

}  // namespace

absl::StatusOr<std::optional<RestoredModel>> LoadLatestCheckpoint(
    const std::string& dir, const CheckpointInfo& expected, const ModelSpec& model,
    int num_slots, std::vector<std::string>* skipped) {
  return LoadNewest(dir, expected, model, num_slots, /*own_file_suffices=*/false, skipped);
}

absl::StatusOr<std::optional<RestoredModel>> LoadShardCheckpoint(
    const std::string& dir, const CheckpointInfo& expected, const ModelSpec& model,
    int num_slots, std::vector<std::string>* skipped) {
  return LoadNewest(dir, expected, model, num_slots, /*own_file_suffices=*/true, skipped);
}

}  // namespace tessera
