#include "server/push_parts.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "common/protocol.h"

namespace tessera {

using tessera::v1::ClientMessage;

PushPartGatherer::Action PushPartGatherer::Offer(ClientMessage* message,
                                                 const ClientMessage** handle,
                                                 absl::Status* error) {
  *handle = message;
  const bool push = message->has_push();
  if (push && dropping_ && message->request_id() == dropping_id_) {
    if (!message->push().more_parts()) dropping_ = false;
    return Action::kDrop;
  }
  if (!(push && (message->push().more_parts() || active_))) {
    if (!active_) return Action::kHandle;
    // Not from a well-behaved client: it finishes a push first.
    active_ = false;
    *error = absl::InvalidArgumentError("a request arrived in the middle of a push sent in parts");
    return Action::kRefuse;
  }
  absl::Status added = KindOf(*message) == RequestKind::kPush
                           ? Add(message)
                           : absl::InvalidArgumentError(
                                 "a part of a push carries a hello or a pull too");
  if (!added.ok()) {
    active_ = false;
    if (message->push().more_parts()) {
      dropping_ = true;
      dropping_id_ = message->request_id();
    }
    *error = std::move(added);
    return Action::kRefuse;
  }
  if (message->push().more_parts()) return Action::kWait;
  active_ = false;
  *handle = &gathered_;
  return Action::kHandle;
}

absl::Status PushPartGatherer::Add(ClientMessage* part) {
  const tessera::v1::PushRequest& p = part->push();
  tessera::v1::PushRequest* push = gathered_.mutable_push();
  if (!active_) {
    gathered_.set_request_id(part->request_id());
    push->set_step(p.step());
    push->set_return_parameters(p.return_parameters());
    push->set_base_version(p.base_version());
    push->mutable_blocks()->Clear();  // keeps the blocks' buffers for reuse
    bytes_ = 0;
    active_ = true;
  } else if (part->request_id() != gathered_.request_id() || p.step() != push->step() ||
             p.return_parameters() != push->return_parameters() ||
             p.base_version() != push->base_version()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "request ", part->request_id(), " does not continue the push sent in parts as request ",
        gathered_.request_id(), " (each part repeats its request id, step and flags)"));
  }
  if (push->blocks_size() + p.blocks_size() > max_blocks_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a push sent in parts carries more than the shard's ", max_blocks_, " blocks"));
  }
  for (tessera::v1::TensorBlock& b : *part->mutable_push()->mutable_blocks()) {
    bytes_ += static_cast<int64_t>(b.data().size() + b.indices().size());
    tessera::v1::TensorBlock* out = push->add_blocks();
    out->set_block_id(b.block_id());
    out->set_dtype(b.dtype());
    out->set_sparse(b.sparse());
    out->set_shm_offset(b.shm_offset());
    out->set_shm_size(b.shm_size());
    out->mutable_data()->swap(*b.mutable_data());
    out->mutable_indices()->swap(*b.mutable_indices());
  }
  if (bytes_ > max_bytes_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a push sent in parts carries more than ", max_bytes_, " payload bytes"));
  }
  return absl::OkStatus();
}

}  // namespace tessera
