// A ParameterClient that calls ShardStores in this process directly: the
// fake for trainer tests, with the same fused push-pull semantics as the
// gRPC service.

#ifndef TESSERA_TESTS_IN_PROCESS_CLIENT_H_
#define TESSERA_TESTS_IN_PROCESS_CLIENT_H_

#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/tensor_codec.h"
#include "server/shard_store.h"
#include "worker/parameter_client.h"

namespace tessera {

// Not thread-safe; one per worker. Does not own the stores.
class InProcessClient final : public ParameterClient {
 public:
  InProcessClient(std::vector<ShardStore*> stores, int worker, int64_t incarnation)
      : stores_(std::move(stores)), worker_(worker), incarnation_(incarnation) {}

  absl::StatusOr<int64_t> Pull(int64_t step, absl::Span<float> params) override {
    int64_t version = INT64_MAX;
    for (ShardStore* s : stores_) {
      tessera::v1::PullResult pull;
      TESSERA_RETURN_IF_ERROR(s->Pull(step, absl::Seconds(30), &pull));
      TESSERA_RETURN_IF_ERROR(Decode(*s, pull, params));
      version = std::min(version, pull.version());
    }
    return version;
  }

  absl::StatusOr<PushPullResult> PushAndPull(int64_t step, absl::Span<const float> grads,
                                             absl::Span<float> params) override {
    int not_applied = 0;
    int late = 0;
    for (ShardStore* s : stores_) {
      tessera::v1::PushRequest push;
      push.set_step(step);
      for (uint32_t id : s->partition().shard_blocks(s->shard())) {
        const BlockInfo& b = s->partition().blocks()[id];
        tessera::v1::TensorBlock* tb = push.add_blocks();
        tb->set_block_id(id);
        tb->set_dtype(tessera::v1::F32);
        EncodeF32(grads.subspan(b.flat_offset, b.num_elements), tb->mutable_data());
      }
      TESSERA_ASSIGN_OR_RETURN(PushOutcome outcome, s->Push(worker_, incarnation_, push));
      not_applied += outcome.applied ? 0 : 1;
      late += outcome.late ? 1 : 0;
    }
    TESSERA_ASSIGN_OR_RETURN(const int64_t version, Pull(step + 1, params));
    return PushPullResult{not_applied, version, late};
  }

 private:
  static absl::Status Decode(const ShardStore& s, const tessera::v1::PullResult& pull,
                             absl::Span<float> params) {
    for (const auto& tb : pull.blocks()) {
      const BlockInfo& b = s.partition().blocks()[tb.block_id()];
      TESSERA_RETURN_IF_ERROR(
          DecodeF32(tb.dtype(), tb.data(), params.subspan(b.flat_offset, b.num_elements)));
    }
    return absl::OkStatus();
  }

  std::vector<ShardStore*> stores_;
  const int worker_;
  const int64_t incarnation_;
};

}  // namespace tessera

#endif  // TESSERA_TESTS_IN_PROCESS_CLIENT_H_
