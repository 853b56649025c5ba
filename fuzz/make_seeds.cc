// Writes the seed inputs of the fuzz targets that take binary inputs, made
// with the project's own code so that they track the protocol and formats:
//   make_seeds OUT_DIR  ->  OUT_DIR/{push,hello,safetensors,checkpoint_load}_fuzz/*
// (job_spec_fuzz's seeds are text files in fuzz/corpus/job_spec_fuzz/.)

#include <sys/stat.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/model_spec.h"
#include "common/safetensors.h"
#include "common/tensor_codec.h"
#include "fuzz/fuzz_util.h"
#include "proto/tessera.pb.h"
#include "server/checkpoint.h"
#include "server/shard_store.h"

namespace tessera::fuzz {
namespace {

using tessera::v1::ClientMessage;
using tessera::v1::PushRequest;

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void Write(const std::string& dir, const std::string& name, const std::string& bytes) {
  std::filesystem::create_directories(dir);
  WriteFile(dir + "/" + name, bytes);
}

// Replaces the real checksum in a safetensors file by the placeholder the
// targets repair (the inverse of RepairChecksum), and drops the header's own
// checksum (readers accept files without one): otherwise every mutation of
// a header value would be refused by that check before reaching the ones
// behind it. The "-real-crc" seeds keep both.
std::string WithCrcPlaceholder(const std::string& file) {
  uint64_t header_len;
  std::memcpy(&header_len, file.data(), 8);
  std::string header = file.substr(8, header_len);
  const std::string header_key = "\"header_crc32\":\"";
  const size_t h = header.find(header_key);
  Check(h != std::string::npos, "written file has no header_crc32");
  size_t h_end = header.find('"', h + header_key.size()) + 1;
  if (header[h_end] == ',') {
    ++h_end;  // "header_crc32":"N", ...
    header.erase(h, h_end - h);
  } else {
    Check(header[h - 1] == ',', "header_crc32 is the only metadata entry");
    header.erase(h - 1, h_end - (h - 1));  // ..., "header_crc32":"N"
  }
  const std::string key = "\"crc32\":\"";
  const size_t at = header.find(key);
  Check(at != std::string::npos, "written file has no crc32");
  const size_t begin = at + key.size();
  const size_t end = header.find('"', begin);
  header.replace(begin, end - begin, std::string(kCrcPlaceholder));
  const uint64_t n = header.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &n, 8);
  return out + header + file.substr(8 + header_len);
}

// --- push_fuzz: [mode] then records [ctl][len][ClientMessage] ---------------

class PushSeed {
 public:
  explicit PushSeed(tessera::v1::ConsistencyMode mode)
      : bytes_(1, mode == tessera::v1::ASYNC ? '\1' : '\0') {}

  PushSeed& Send(int worker, int64_t incarnation, const ClientMessage& m) {
    const std::string wire = m.SerializeAsString();
    Check(wire.size() <= 255, "seed message over 255 bytes");
    bytes_ += static_cast<char>(((worker + 1) & 3) | ((incarnation & 3) << 2));
    bytes_ += static_cast<char>(wire.size());
    bytes_ += wire;
    return *this;
  }
  PushSeed& Disconnect(int worker, int64_t incarnation) {
    bytes_ += static_cast<char>(((worker + 1) & 3) | ((incarnation & 3) << 2) | 0xC0);
    return *this;
  }
  const std::string& bytes() const { return bytes_; }

 private:
  std::string bytes_;
};

ClientMessage Hello(int worker, int64_t incarnation) {
  ClientMessage m;
  m.mutable_hello()->set_worker_id(worker);
  m.mutable_hello()->set_incarnation(incarnation);
  return m;
}

ClientMessage Pull(int64_t step) {
  ClientMessage m;
  m.mutable_pull()->set_step(step);
  return m;
}

// Shard 0's blocks of the fuzz job, as the targets compute them.
std::vector<BlockInfo> OwnedBlocks() {
  auto store = ShardStore::Create(SmallJob(tessera::v1::SYNC, 2), 0);
  Check(store.ok(), "cannot create the seed store");
  std::vector<BlockInfo> blocks;
  for (uint32_t id : (*store)->partition().shard_blocks(0)) {
    blocks.push_back((*store)->partition().blocks()[id]);
  }
  return blocks;
}

ClientMessage Push(int64_t step, float value, bool return_parameters = false,
                   int64_t base_version = 0) {
  ClientMessage m;
  PushRequest* p = m.mutable_push();
  p->set_step(step);
  p->set_return_parameters(return_parameters);
  p->set_base_version(base_version);
  for (const BlockInfo& b : OwnedBlocks()) {
    tessera::v1::TensorBlock* tb = p->add_blocks();
    tb->set_block_id(b.id);
    tb->set_dtype(tessera::v1::F32);
    std::vector<float> values(b.num_elements);
    for (size_t i = 0; i < values.size(); ++i) values[i] = value * (1.0f + 0.125f * i);
    EncodeF32(values, tb->mutable_data());
  }
  return m;
}

// The same push as top-k sparse blocks: elements 0 and 2 of each block.
ClientMessage SparsePush(int64_t step, float value) {
  ClientMessage m = Push(step, value);
  for (tessera::v1::TensorBlock& tb : *m.mutable_push()->mutable_blocks()) {
    tb.set_sparse(true);
    std::vector<float> values;
    tb.clear_indices();
    for (uint32_t i : {0u, 2u}) {
      if (i >= tb.data().size() / 4) continue;
      tb.mutable_indices()->append(reinterpret_cast<const char*>(&i), 4);
      values.push_back(value);
    }
    EncodeF32(values, tb.mutable_data());
  }
  return m;
}

// Blocks [begin, end) of `push` as one part (PushRequest.more_parts).
ClientMessage Part(const ClientMessage& push, int begin, int end, bool more) {
  ClientMessage m = push;
  auto* blocks = m.mutable_push()->mutable_blocks();
  end = std::min(end, blocks->size());
  blocks->DeleteSubrange(end, blocks->size() - end);
  blocks->DeleteSubrange(0, std::min(begin, blocks->size()));
  m.mutable_push()->set_more_parts(more);
  return m;
}

void PushSeeds(const std::string& dir) {
  const ClientMessage whole = Push(0, 0.5f, true);
  Write(dir, "sync-step-in-parts", PushSeed(tessera::v1::SYNC)
                                       .Send(0, 1, Hello(0, 1))
                                       .Send(1, 1, Hello(1, 1))
                                       .Send(0, 1, Part(whole, 0, 1, true))
                                       .Send(0, 1, Part(whole, 1, 100, false))
                                       .Send(1, 1, Part(whole, 0, 1, true))
                                       .Send(1, 1, Pull(1))
                                       .Send(1, 1, Push(0, -0.25f, true))
                                       .bytes());
  Write(dir, "sync-step", PushSeed(tessera::v1::SYNC)
                              .Send(0, 1, Hello(0, 1))
                              .Send(1, 1, Hello(1, 1))
                              .Send(0, 1, Push(0, 0.5f, true))
                              .Send(1, 1, Push(0, -0.25f, true))
                              .Send(0, 1, Pull(1))
                              .bytes());
  Write(dir, "async-pushes", PushSeed(tessera::v1::ASYNC)
                                 .Send(0, 1, Hello(0, 1))
                                 .Send(0, 1, Push(0, 0.5f))
                                 .Send(1, 0, Push(0, 0.25f, false, 0))
                                 .Send(0, 1, Push(1, -1.0f, true, 1))
                                 .Send(0, 1, Pull(0))
                                 .bytes());
  Write(dir, "duplicates-and-old-incarnations", PushSeed(tessera::v1::ASYNC)
                                                    .Send(0, 2, Push(0, 1.0f))
                                                    .Send(0, 2, Push(0, 1.0f))
                                                    .Send(0, 1, Push(1, 1.0f))
                                                    .Send(0, 3, Push(0, 1.0f))
                                                    .bytes());
  for (auto mode : {tessera::v1::SYNC, tessera::v1::ASYNC}) {
    ClientMessage unsorted = SparsePush(1, 1.0f);
    std::string* idx = unsorted.mutable_push()->mutable_blocks(0)->mutable_indices();
    if (idx->size() >= 8) std::swap_ranges(idx->begin(), idx->begin() + 4, idx->begin() + 4);
    Write(dir, absl::StrCat("sparse-", ModeName(mode)), PushSeed(mode)
                                                          .Send(0, 0, SparsePush(0, 0.5f))
                                                          .Send(1, 0, SparsePush(0, -2.0f))
                                                          .Send(0, 0, unsorted)
                                                          .Send(0, 0, SparsePush(1, 1.0f))
                                                          .bytes());
  }
  Write(dir, "disconnect-completes-step", PushSeed(tessera::v1::SYNC)
                                              .Send(0, 0, Push(0, 2.0f))
                                              .Disconnect(1, 0)
                                              .Send(0, 0, Pull(1))
                                              .Send(0, 0, Push(1, 2.0f, true))
                                              .bytes());
  // The documented bad-input classes: huge finite gradients from every
  // worker, and malformed pushes followed by a good one.
  for (auto mode : {tessera::v1::SYNC, tessera::v1::ASYNC}) {
    PushSeed huge(mode);
    for (int step = 0; step < 3; ++step) {
      huge.Send(0, 0, Push(step, 1e38f)).Send(1, 0, Push(step, 1e38f));
    }
    Write(dir, absl::StrCat("huge-gradients-", ModeName(mode)), huge.bytes());
  }
  PushSeed bad(tessera::v1::SYNC);
  ClientMessage m = Push(0, 1.0f);
  m.mutable_push()->mutable_blocks(0)->set_dtype(tessera::v1::BF16);
  bad.Send(0, 0, m);
  m = Push(0, 1.0f);
  m.mutable_push()->mutable_blocks(0)->mutable_data()->resize(4);
  bad.Send(0, 0, m);
  m = Push(0, 1.0f);
  m.mutable_push()->mutable_blocks(0)->set_block_id(99);
  bad.Send(0, 0, m);
  m = Push(0, 1.0f);
  m.mutable_push()->mutable_blocks(1)->set_block_id(m.push().blocks(0).block_id());
  bad.Send(0, 0, m);
  m = Push(0, 1.0f);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(m.mutable_push()->mutable_blocks(0)->mutable_data()->data(), &nan, 4);
  bad.Send(0, 0, m);
  m = Push(-1, 1.0f);
  bad.Send(0, 0, m);
  m = Push(0, 1.0f);
  m.mutable_push()->mutable_blocks()->RemoveLast();
  bad.Send(0, 0, m);
  bad.Send(0, 0, Push(3, 1.0f));  // ahead of the step
  bad.Send(0, 0, Push(0, 1.0f));
  Write(dir, "bad-then-good", bad.bytes());
}

// --- safetensors_fuzz and checkpoint_load_fuzz ------------------------------

void SafetensorsSeeds(const std::string& dir, const std::string& scratch) {
  const std::vector<float> w = {1, 2, 3, 4, 5, 6}, b = {-1, 0.5f}, scalar = {7};
  const std::string path = scratch + "/seed.safetensors";
  Check(WriteSafetensorsFile(path, {{"w", {2, 3}, w}, {"b", {2}, b}, {"s", {}, scalar}},
                             {{"format", "seed"}, {"note", "a \"quoted\"\tvalue"}})
            .ok(),
        "write seed");
  Write(dir, "three-tensors", WithCrcPlaceholder(ReadAll(path)));
  Write(dir, "three-tensors-real-crc", ReadAll(path));
  Check(WriteSafetensorsFile(path, {{"empty", {0, 4}, {}}}, {}).ok(), "write seed");
  Write(dir, "empty-tensor", WithCrcPlaceholder(ReadAll(path)));
  Check(WriteSafetensorsFile(path, {}, {}).ok(), "write seed");
  Write(dir, "no-tensors", ReadAll(path));
}

void CheckpointSeeds(const std::string& dir, const std::string& scratch) {
  tessera::v1::JobSpec job = SmallJob(tessera::v1::ASYNC, 1);
  job.set_num_shards(1);
  auto store = ShardStore::Create(job, 0);
  Check(store.ok(), "cannot create the checkpoint seed store");
  PushRequest push = Push(0, 0.5f).push();
  push.clear_blocks();
  for (uint32_t id : (*store)->partition().shard_blocks(0)) {
    tessera::v1::TensorBlock* tb = push.add_blocks();
    tb->set_block_id(id);
    tb->set_dtype(tessera::v1::F32);
    std::vector<float> values((*store)->partition().blocks()[id].num_elements, 0.5f);
    EncodeF32(values, tb->mutable_data());
  }
  Check((*store)->Push(0, 0, push).ok(), "seed push");
  absl::StatusOr<ModelSpec> model = ParseModelSpec(job.model(), LossKind::kMeanSquaredError);
  Check(model.ok(), "seed model");
  CheckpointInfo info;
  info.job_name = job.name();
  info.model = job.model();
  info.optimizer_type = tessera::v1::OptimizerType_Name(job.optimizer().type());
  info.shard = 0;
  info.num_shards = 1;
  absl::StatusOr<std::string> path =
      WriteShardCheckpoint(scratch + "/ckpt", info, *model, (*store)->Snapshot(), 3);
  Check(path.ok(), "write checkpoint seed");
  Write(dir, "adam-one-shard", WithCrcPlaceholder(ReadAll(*path)));
  Write(dir, "adam-one-shard-real-crc", ReadAll(*path));
}

void HelloSeeds(const std::string& dir) {
  // FuzzedDataProvider reads these from the end; any bytes are a program.
  Write(dir, "short", std::string("\x00\x01\x02\x03\x10\x20\x30\x40", 8));
  Write(dir, "ramp", [] {
    std::string s;
    for (int i = 0; i < 96; ++i) s += static_cast<char>(i * 37);
    return s;
  }());
}

}  // namespace
}  // namespace tessera::fuzz

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 2;
  }
  const std::string out = argv[1];
  tessera::fuzz::ScratchDir scratch("make-seeds");
  tessera::fuzz::PushSeeds(out + "/push_fuzz");
  tessera::fuzz::HelloSeeds(out + "/hello_fuzz");
  tessera::fuzz::SafetensorsSeeds(out + "/safetensors_fuzz", scratch.path());
  tessera::fuzz::CheckpointSeeds(out + "/checkpoint_load_fuzz", scratch.path());
  return 0;
}
