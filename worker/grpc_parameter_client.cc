#include "worker/grpc_parameter_client.h"

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <iostream>
#include <optional>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/grpc_status.h"
#include "common/protocol.h"
#include "common/session_stream.h"
#include "common/shared_region.h"
#include "common/status_macros.h"
#include "common/tensor_codec.h"
#include "proto/tessera.grpc.pb.h"

namespace tessera {
namespace {

using tessera::v1::ClientMessage;
using tessera::v1::ServerMessage;

// Bounds each request on a stream: a message exchange on a gRPC stream has
// no deadline of its own (the stream's would end the whole session), so a
// thread cancels the stream's context when the reply to the armed request
// is overdue. The caller sees the cancelled stream fail, learns from
// Disarm() that the deadline did it, and retries on a new stream.
// Thread-safe.
class RequestWatchdog {
 public:
  RequestWatchdog() : thread_([this] { Loop(); }) {}
  ~RequestWatchdog() {
    {
      absl::MutexLock lock(&mu_);
      stop_ = true;
    }
    thread_.join();
  }

  // Cancels `context` unless Disarm() is called before `deadline`.
  void Arm(grpc::ClientContext* context, absl::Time deadline) {
    absl::MutexLock lock(&mu_);
    context_ = context;
    deadline_ = deadline;
    fired_ = false;
  }

  // Returns true when the deadline passed and the context was cancelled.
  bool Disarm() {
    absl::MutexLock lock(&mu_);
    context_ = nullptr;
    return fired_;
  }

 private:
  void Loop() {
    absl::MutexLock lock(&mu_);
    while (!stop_) {
      if (context_ != nullptr && absl::Now() >= deadline_) {
        context_->TryCancel();
        context_ = nullptr;
        fired_ = true;
      }
      // Woken by Arm, Disarm and the destructor (any change of these
      // fields), or at the armed deadline.
      grpc::ClientContext* const armed = context_;
      const absl::Time deadline = deadline_;
      auto changed = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stop_ || context_ != armed || deadline_ != deadline;
      };
      mu_.AwaitWithDeadline(absl::Condition(&changed),
                            armed != nullptr ? deadline : absl::InfiniteFuture());
    }
  }

  absl::Mutex mu_;
  grpc::ClientContext* context_ ABSL_GUARDED_BY(mu_) = nullptr;
  absl::Time deadline_ ABSL_GUARDED_BY(mu_);
  bool fired_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;  // last: starts after the fields above exist
};

// How a shard acknowledged a push.
struct PushAck {
  bool applied = false;
  bool late = false;  // not applied: its step closed without it
};

// One shard's stream and the messages reused on it. Not thread-safe: only
// the shard's own lane touches it.
class ShardStream {
 public:
  ShardStream(int shard, std::string address, const Partition& partition)
      : shard_(shard), address_(std::move(address)), partition_(partition) {}

  ~ShardStream() { Close(); }

  absl::Status Open(const GrpcClientOptions& options) {
    options_ = options;
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(options.max_message_bytes);
    args.SetMaxSendMessageSize(options.max_message_bytes);
    // Keepalive agreed with the servers (server.cc allows pings every 5 s):
    // a frozen or vanished server is noticed within about 15 s even when
    // no reply is due.
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
    args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
    args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
    // Reconnect quickly after a server restart.
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
    // gRPC gives each connection attempt at least this long (default 20 s):
    // after a partition whose SYNs were dropped, an attempt begun during
    // the outage would hold off the next one for 20 s after the heal.
    args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 1000);
    channel_ = CreateTunedChannel(
        address_,
        options.credentials != nullptr ? options.credentials : grpc::InsecureChannelCredentials(),
        options.socket_tuning, args);
    const auto deadline = std::chrono::system_clock::now() +
                          absl::ToChronoMilliseconds(options.connect_timeout);
    if (!channel_->WaitForConnected(deadline)) {
      return absl::UnavailableError(
          absl::StrCat(Where(), ": not reachable within ",
                       absl::FormatDuration(options.connect_timeout)));
    }
    return StartSession();
  }

  // The worker's clock on this shard, from the reply to the latest Hello.
  int64_t worker_clock() const { return worker_clock_; }

  // Tensor payload bytes pushed plus pulled on this stream so far.
  int64_t payload_bytes() const { return payload_bytes_; }

  // Pull request for `step`; decodes into `params`.
  absl::Status Pull(int64_t step, absl::Span<float> params, int64_t* version) {
    request_.Clear();
    request_.mutable_pull()->set_step(step);
    return CallForParams(&request_, params, version);
  }

  // Whether pushes go on the stream from the serializer's buffer (no
  // region, dense): the path that can leave in parts as gradients become
  // ready.
  bool pushes_on_stream() const { return region_ == nullptr && options_.top_k_fraction <= 0; }

  // Fused push-pull. With `wait_param` (only where pushes_on_stream()), the
  // push goes last layer first, one part per parameter, and each part
  // waits until wait_param(its parameter index) says the gradient is final
  // (false: the exchange was aborted; nothing more is sent).
  absl::Status PushAndPull(int64_t step, absl::Span<const float> grads, absl::Span<float> params,
                           PushAck* ack, int64_t* version,
                           std::function<bool(int)> wait_param = nullptr) {
    absl::Status s = PreparePush(step, grads, std::move(wait_param));
    if (s.ok()) s = CallForParams(&push_, params, version);
    wait_param_ = nullptr;
    TESSERA_RETURN_IF_ERROR(s);
    TakeAck(ack);
    return absl::OkStatus();
  }

  // The same exchange in three steps, so that one thread can write every
  // shard's push before it reads any reply (GrpcParameterClient does so
  // when every shard's payloads go through shared memory).
  // SendPushAndPull encodes and writes the push. ReadPushAndPull reads the
  // reply without retrying, so that the caller can take every shard's
  // reply before any shard's retries wait out a server that is down.
  // FinishPushAndPull, given what the read returned, goes on as
  // PushAndPull would after a failed write or read (reopen the stream and
  // resend with backoff; exactly-once apply makes the resend safe) and
  // decodes. Call the last two, in that order, after every
  // SendPushAndPull that returned OK.
  absl::Status SendPushAndPull(int64_t step, absl::Span<const float> grads) {
    TESSERA_RETURN_IF_ERROR(PreparePush(step, grads, nullptr));
    wrote_ = false;
    if (stream_ != nullptr) TESSERA_RETURN_IF_ERROR(ExchangeWrite(&push_, &wrote_));
    return absl::OkStatus();
  }
  absl::Status ReadPushAndPull(absl::Span<float> params) {
    decode_into_ = params;
    absl::Status s = absl::UnavailableError("no stream");
    if (stream_ != nullptr) s = ExchangeRead(&push_, wrote_);
    wrote_ = false;
    decode_into_ = {};
    return s;
  }
  absl::Status FinishPushAndPull(absl::Status read, absl::Span<float> params, PushAck* ack,
                                 int64_t* version) {
    TESSERA_RETURN_IF_ERROR(CallForParams(&push_, params, version, std::move(read)));
    TakeAck(ack);
    return absl::OkStatus();
  }

  // Whether this shard's payloads go through a shared-memory region now.
  bool through_region() const { return region_ != nullptr; }

 private:
  // Fills push_ for `step`: block ids and payloads (encoded into the
  // region, into buffers gRPC will send from, or, for the stream with
  // `wait_param`, left to be encoded as the parts are written).
  absl::Status PreparePush(int64_t step, absl::Span<const float> grads,
                           std::function<bool(int)> wait_param) {
    // The push message keeps its block buffers from step to step; only the
    // payload bytes are rewritten.
    const std::vector<uint32_t>& ids = partition_.shard_blocks(shard_);
    tessera::v1::PushRequest* push = push_.mutable_push();
    // With a shared-memory region, dense payloads are written straight
    // into its request area (one copy instead of two). Without one, into a
    // buffer whose slices gRPC sends as they are (one copy instead of two
    // as well: no serialisation copy).
    const bool top_k = options_.top_k_fraction > 0;
    const absl::Span<char> area =
        region_ != nullptr ? region_->request_area() : absl::Span<char>();
    absl::Span<char> lent;
    zero_copy_.clear();
    lent_.clear();
    if (pushes_on_stream()) {
      uint64_t bytes = 0;
      for (uint32_t id : ids) {
        bytes = AlignPayload(bytes + partition_.blocks()[id].num_elements *
                                         DTypeSize(options_.wire_dtype));
      }
      lent = serializer_.Allocate(bytes);
      zero_copy_.resize(ids.size());
      lent_.assign(ids.size(), {});
    }
    // Where each owned block goes in the push: in order, or with
    // wait_param the last parameter's blocks first (backward's order).
    if (wait_param != nullptr && lent.empty()) {
      // Payloads are encoded right below: every gradient must be final.
      for (uint32_t id : ids) {
        if (!wait_param(partition_.blocks()[id].param_index)) {
          return Annotate(absl::CancelledError("exchange aborted"), Where());
        }
      }
      wait_param = nullptr;
    }
    wait_param_ = std::move(wait_param);
    push_aborted_ = false;
    position_.resize(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) position_[i] = static_cast<int>(i);
    if (wait_param_ != nullptr) {
      std::stable_sort(position_.begin(), position_.end(), [&](int a, int b) {
        return partition_.blocks()[ids[a]].param_index > partition_.blocks()[ids[b]].param_index;
      });
    }
    block_param_.resize(ids.size());
    while (push->blocks_size() < static_cast<int>(ids.size())) push->add_blocks();
    uint64_t area_used = 0;
    uint64_t lent_used = 0;
    push->set_step(step);
    push->set_return_parameters(true);
    push->set_base_version(version_);
    for (size_t k = 0; k < ids.size(); ++k) {
      const int i = position_[k];  // owned block i goes at position k
      const BlockInfo& b = partition_.blocks()[ids[i]];
      tessera::v1::TensorBlock* tb = push->mutable_blocks(static_cast<int>(k));
      block_param_[k] = b.param_index;
      tb->set_block_id(b.id);
      tb->set_dtype(options_.wire_dtype);
      const absl::Span<const float> g = grads.subspan(b.flat_offset, b.num_elements);
      if (top_k) {
        // Error feedback: what a push leaves out is added to the next one.
        // A retried request resends these same bytes, so a resend does not
        // disturb the residual.
        if (residual_.size() < ids.size()) residual_.resize(ids.size());
        if (residual_[i].size() != g.size()) residual_[i].assign(g.size(), 0.0f);
        const int64_t keep = static_cast<int64_t>(
            std::ceil(options_.top_k_fraction * static_cast<double>(g.size())));
        tb->set_sparse(true);
        EncodeTopK(options_.wire_dtype, g, keep, absl::MakeSpan(residual_[i]), &topk_scratch_,
                   tb->mutable_indices(), tb->mutable_data());
      } else if (!lent.empty()) {
        // Encoded part by part as the push is written (EncodeLent).
        const absl::Span<char> out =
            lent.subspan(lent_used, g.size() * DTypeSize(options_.wire_dtype));
        lent_used = AlignPayload(lent_used + out.size());
        tb->clear_data();
        tb->clear_shm_offset();
        tb->clear_shm_size();
        zero_copy_[k] = absl::string_view(out.data(), out.size());
        lent_[k] = {g, out};
      } else {
        EncodeBlockPayload(options_.wire_dtype, g, area, &area_used, tb);
      }
      payload_bytes_ += static_cast<int64_t>(tb->data().size() + tb->shm_size() +
                                             tb->indices().size() +
                                             (lent.empty() ? 0 : zero_copy_[k].size()));
    }
    return absl::OkStatus();
  }

  std::string Where() const {
    return absl::StrCat("shard ", shard_, " (", address_, ")");
  }

  // What the reply to the push says of it.
  void TakeAck(PushAck* ack) const {
    ack->applied = reply_.push().applied();
    ack->late = reply_.push().late();
  }

  static bool Retryable(const absl::Status& s) {
    return s.code() == absl::StatusCode::kUnavailable ||
           s.code() == absl::StatusCode::kCancelled ||
           s.code() == absl::StatusCode::kAborted ||
           s.code() == absl::StatusCode::kDeadlineExceeded;
  }

  // Sends `request` (with a fresh id) and reads its reply, reopening the
  // stream and resending while the failure is one a server restart or a
  // network fault explains.
  // `failed`, when set, is the outcome of an attempt already made (by
  // FinishPushAndPull): returned as it is when OK or not retryable, and
  // otherwise retried like a failure of the loop's own.
  absl::Status Call(ClientMessage* request, std::optional<absl::Status> failed = std::nullopt) {
    const absl::Time deadline = absl::Now() + options_.retry_timeout;
    absl::Duration backoff = absl::Milliseconds(50);
    while (true) {
      absl::Status s;
      if (failed.has_value()) {
        s = *std::move(failed);
        failed.reset();
      } else {
        s = stream_ != nullptr ? Exchange(request) : absl::UnavailableError("no stream");
      }
      if (s.ok() || !Retryable(s)) return s;
      if (push_aborted_) return Annotate(absl::CancelledError("exchange aborted"), Where());
      if (absl::Now() + backoff > deadline) {
        return Annotate(s, absl::StrCat("gave up after retrying for ",
                                        absl::FormatDuration(options_.retry_timeout)));
      }
      if (!warned_) {
        std::cerr << "tessera-worker: " << s.message() << "; retrying" << std::endl;
        warned_ = true;
      }
      WaitOutBackoff(backoff);
      backoff = std::min(backoff * 2, absl::Seconds(2));
      Close();
      absl::Status opened = StartSession();
      if (opened.ok()) {
        std::cerr << "tessera-worker: " << Where() << " reconnected" << std::endl;
        warned_ = false;
      } else if (!Retryable(opened)) {
        return opened;
      }
    }
  }

  // Waits `backoff` while letting the channel reconnect. With a plain sleep
  // here, a new connection to a restarted server was seen sitting
  // established but without its HTTP/2 preface for seconds (the worker's
  // threads were all outside gRPC), and each attempt in between failed at
  // once; waiting on the channel's state drives the connection.
  // Returns early when the channel (re)connects during the wait; a channel
  // that was connected throughout (a server that answered but refused)
  // waits the whole backoff.
  void WaitOutBackoff(absl::Duration backoff) {
    const absl::Time until = absl::Now() + backoff;
    const bool was_ready = channel_->GetState(/*try_to_connect=*/true) == GRPC_CHANNEL_READY;
    while (absl::Now() < until) {
      const grpc_connectivity_state state = channel_->GetState(/*try_to_connect=*/true);
      if (state == GRPC_CHANNEL_READY) {
        if (!was_ready) return;
        absl::SleepFor(until - absl::Now());
        return;
      }
      channel_->WaitForStateChange(state, absl::ToChronoTime(until));
    }
  }

  absl::Status StartSession() {
    context_ = std::make_unique<grpc::ClientContext>();
    stream_ = std::make_unique<SessionStream>(channel_, context_.get());
    ClientMessage hello;
    tessera::v1::Hello* h = hello.mutable_hello();
    h->set_worker_id(options_.worker_id);
    h->set_incarnation(options_.incarnation);
    h->set_job_hash(options_.job_hash);
    h->set_shard(shard_);
    h->set_reply_part_bytes(options_.part_bytes);
    h->set_protocol_version(kSessionProtocolVersion);
    // Every stream gets a region of its own: after a reconnect the old
    // server session may still hold the previous one.
    std::unique_ptr<SharedRegion> offered;
    if (options_.shared_memory && IsLocalTarget(address_)) {
      const uint64_t bytes = SharedAreaBytes(partition_.shard_bytes(shard_),
                                             partition_.shard_blocks(shard_).size());
      absl::StatusOr<std::unique_ptr<SharedRegion>> r = SharedRegion::Create(bytes, bytes);
      if (r.ok()) {
        offered = *std::move(r);
        h->set_shm_name(offered->name());
        h->set_shm_size(offered->size());
        h->set_shm_nonce(std::string(offered->nonce()));
      } else {
        NoteSharedMemory(false, r.status().message());
      }
    }
    TESSERA_RETURN_IF_ERROR(Exchange(&hello));
    if (reply_.protocol_version() != kSessionProtocolVersion) {
      // The region offered above is removed with `offered`.
      return absl::FailedPreconditionError(
          absl::StrCat(Where(), " speaks session protocol ", reply_.protocol_version(),
                       " but this worker speaks ", kSessionProtocolVersion,
                       ": run the same Tessera release on every server and worker"));
    }
    worker_clock_ = reply_.worker_clock();
    if (offered != nullptr) {
      if (reply_.shm_accepted()) {
        offered->Unlink();  // mapped on both sides; nothing to leave behind
        region_ = std::move(offered);
      }
      NoteSharedMemory(reply_.shm_accepted(), reply_.shm_detail());
    }
    return absl::OkStatus();
  }

  // One line when the path changes (first session, or a new server that
  // decides otherwise), not one per reconnect.
  void NoteSharedMemory(bool used, absl::string_view detail) {
    const int state = used ? 1 : 2;
    if (state == shm_state_) return;
    shm_state_ = state;
    if (used) {
      std::cerr << "tessera-worker: " << Where() << ": payloads through shared memory" << std::endl;
    } else {
      std::cerr << "tessera-worker: " << Where() << ": no shared memory (" << detail
                << "); payloads go on the stream" << std::endl;
    }
  }

  void Close() {
    if (stream_ != nullptr) {
      context_->TryCancel();
      stream_->Finish().ok();  // the outcome no longer matters
      stream_.reset();
    }
    if (region_ != nullptr) {
      // A push written straight into this region is resent on the next
      // stream, which has a region of its own (or none): take its bytes
      // back into the message first.
      if (push_.has_push()) {
        MaterializeBlocks(push_.mutable_push()->mutable_blocks(), region_->request_area())
            .IgnoreError();  // ranges written here, always inside the area
      }
      region_.reset();
    }
  }

  absl::Status Exchange(ClientMessage* request) {
    bool wrote = false;
    TESSERA_RETURN_IF_ERROR(ExchangeWrite(request, &wrote));
    return ExchangeRead(request, wrote);
  }

  // Exchange's first half: gives `request` a fresh id and writes it;
  // `wrote` says whether the write went through (ExchangeRead reports why
  // not). An error means nothing was written: the exchange was aborted.
  absl::Status ExchangeWrite(ClientMessage* request, bool* wrote) {
    request->set_request_id(next_id_++);
    watchdog_.Arm(context_.get(), absl::Now() + options_.request_timeout);
    bool ok;
    if (request->has_push() && region_ == nullptr) {
      // Payloads as slices of the buffer they are encoded into, in parts,
      // each encoded while the server reads the one before (layer-wise:
      // one part per parameter, as backward finishes it).
      SessionStream::Parts parts;
      parts.min_bytes = options_.part_bytes;
      parts.before_part = encode_lent_;
      if (wait_param_ != nullptr) parts.cut_after = param_ends_;
      ok = stream_->WritePush(*request, zero_copy_, &serializer_, parts);
    } else {
      // A push's payloads go into the region for the write only: the
      // message keeps them, so a retry on a new stream (new region) can
      // resend. A push encoded for the stream before a reconnect takes its
      // payloads into the message first.
      const bool offload = region_ != nullptr && request->has_push();
      auto* blocks = offload ? request->mutable_push()->mutable_blocks() : nullptr;
      if (offload) {
        if (!EncodeLent(0, static_cast<int>(zero_copy_.size()))) {
          watchdog_.Disarm();
          return Annotate(absl::CancelledError("exchange aborted"), Where());
        }
        for (size_t i = 0; i < zero_copy_.size(); ++i) {
          const absl::string_view lent = zero_copy_[i];
          if (lent.data() != nullptr) (*blocks)[i].set_data(lent.data(), lent.size());
        }
        zero_copy_.clear();
        OffloadBlocks(blocks, region_->request_area(), &parked_);
      }
      ok = stream_->Write(*request);
      if (offload) RestoreBlocks(blocks, &parked_);
    }
    *wrote = ok;
    return absl::OkStatus();
  }

  // Exchange's second half: reads the reply to `request` (decoding
  // parameters that come in parts) unless the write failed, and on any
  // failure closes the stream and says why.
  absl::Status ExchangeRead(ClientMessage* request, bool wrote) {
    bool ok = wrote && stream_->Read(&reply_);
    // Parameters in parts: each part is decoded while the next comes.
    decoded_blocks_ = 0;
    while (ok && reply_.request_id() == request->request_id() && reply_.code() == 0 &&
           reply_.pull().more_parts()) {
      absl::Status part =
          decode_into_.empty()
              ? absl::DataLossError("parameters in parts in reply to a request for none")
              : DecodeBlocks(decode_into_);
      if (!part.ok()) {
        watchdog_.Disarm();
        context_->TryCancel();  // the rest of the reply is not wanted
        stream_->Finish().ok();
        stream_.reset();
        return Annotate(part, Where());
      }
      ok = stream_->Read(&reply_);
    }
    const bool overdue = watchdog_.Disarm();
    if (!ok && !stream_->local_error().ok()) {
      const absl::Status bad = stream_->local_error();
      context_->TryCancel();
      stream_->Finish().ok();  // the outcome no longer matters
      stream_.reset();
      return Annotate(bad, Where());
    }
    if (!ok) {
      absl::Status s = FromGrpcStatus(stream_->Finish());
      stream_.reset();
      if (overdue) {
        s = absl::DeadlineExceededError(
            absl::StrCat("no reply within ", absl::FormatDuration(options_.request_timeout)));
      } else if (s.ok()) {
        s = absl::UnavailableError("stream closed by the server");
      }
      return Annotate(s, Where());
    }
    if (reply_.request_id() != request->request_id()) {
      return absl::InternalError(absl::StrCat(
          Where(), ": reply to request ", reply_.request_id(), ", expected ",
          request->request_id()));
    }
    return Annotate(StatusFromCode(reply_.code(), reply_.message()), Where());
  }

  // Encodes the gradients of blocks [begin, end) of a push on the stream
  // into their places in the serializer's buffer, each once wait_param_
  // says it is final. False when the exchange was aborted.
  bool EncodeLent(int begin, int end) {
    for (int i = begin; i < end && i < static_cast<int>(lent_.size()); ++i) {
      if (lent_[i].second.data() == nullptr) continue;
      if (wait_param_ != nullptr && !wait_param_(block_param_[i])) {
        push_aborted_ = true;
        return false;
      }
      EncodeTo(options_.wire_dtype, lent_[i].first, lent_[i].second);
    }
    return true;
  }

  // Call() for a request answered with parameters: decodes them into
  // `params` (each part as it arrives, when they come in parts).
  // `failed` as for Call().
  absl::Status CallForParams(ClientMessage* request, absl::Span<float> params,
                             int64_t* version,
                             std::optional<absl::Status> failed = std::nullopt) {
    decode_into_ = params;
    const absl::Status s = Call(request, std::move(failed));
    decode_into_ = {};
    TESSERA_RETURN_IF_ERROR(s);
    return Decode(params, version);
  }

  // Decodes the reply's parameters (its last part, when it came in parts)
  // into `params` and checks that every block of the shard came.
  absl::Status Decode(absl::Span<float> params, int64_t* version) {
    const tessera::v1::PullResult& pull = reply_.pull();
    const int64_t expected = static_cast<int64_t>(partition_.shard_blocks(shard_).size());
    if (decoded_blocks_ + pull.blocks_size() != expected) {
      return absl::DataLossError(absl::StrCat(Where(), ": sent ",
                                              decoded_blocks_ + pull.blocks_size(),
                                              " blocks, expected ", expected));
    }
    TESSERA_RETURN_IF_ERROR(DecodeBlocks(params));
    *version = version_ = pull.version();
    return absl::OkStatus();
  }

  // Decodes the blocks of reply_ (one part of the parameters, or all).
  absl::Status DecodeBlocks(absl::Span<float> params) {
    const tessera::v1::PullResult& pull = reply_.pull();
    for (const tessera::v1::TensorBlock& tb : pull.blocks()) {
      if (tb.block_id() >= partition_.blocks().size() ||
          partition_.blocks()[tb.block_id()].shard != shard_) {
        return absl::DataLossError(
            absl::StrCat(Where(), ": sent block ", tb.block_id(), " it does not own"));
      }
      const BlockInfo& b = partition_.blocks()[tb.block_id()];
      absl::StatusOr<absl::string_view> payload = BlockPayload(
          tb, region_ != nullptr ? region_->reply_area() : absl::Span<const char>());
      if (!payload.ok()) return Annotate(absl::DataLossError(payload.status().message()), Where());
      payload_bytes_ += static_cast<int64_t>(payload->size());
      TESSERA_RETURN_IF_ERROR(Annotate(
          DecodeF32(tb.dtype(), *payload, params.subspan(b.flat_offset, b.num_elements)),
          absl::StrCat(Where(), " block ", b.id)));
      ++decoded_blocks_;
    }
    return absl::OkStatus();
  }

  const int shard_;
  const std::string address_;
  const Partition& partition_;
  GrpcClientOptions options_;
  bool warned_ = false;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<grpc::ClientContext> context_;
  std::unique_ptr<SessionStream> stream_;
  // Buffers that push payloads are encoded into and sent from, and each
  // block's payload in the current one (empty when the push's payloads are
  // in the message or in a region).
  PushSerializer serializer_;
  std::vector<absl::string_view> zero_copy_;
  // Each such payload's gradients and its place in the buffer.
  std::vector<std::pair<absl::Span<const float>, absl::Span<char>>> lent_;
  const std::function<bool(int, int)> encode_lent_ = [this](int b, int e) {
    return EncodeLent(b, e);
  };
  // Layer-wise pushes: a part ends where the next block is another
  // parameter's.
  const std::function<bool(int)> param_ends_ = [this](int i) {
    return i + 1 < static_cast<int>(block_param_.size()) && block_param_[i] != block_param_[i + 1];
  };
  std::function<bool(int)> wait_param_;  // set during a layer-wise push
  bool push_aborted_ = false;
  bool wrote_ = false;  // SendPushAndPull's write went through
  std::vector<int> position_;     // owned block -> position in the push
  std::vector<int> block_param_;  // parameter index of the block at each position
  // Top-k error feedback: per owned block (in shard_blocks order), what
  // earlier pushes left out.
  std::vector<std::vector<float>> residual_;
  std::vector<uint32_t> topk_scratch_;
  RequestWatchdog watchdog_;
  // Same-host shared memory of the current stream (null: payloads inline).
  std::unique_ptr<SharedRegion> region_;
  std::vector<std::string> parked_;
  int shm_state_ = 0;  // last reported: 0 none, 1 used, 2 not used
  uint64_t next_id_ = 1;
  int64_t version_ = 0;  // of the parameters last received
  int64_t worker_clock_ = 0;
  int64_t payload_bytes_ = 0;  // pushed plus pulled
  // Where the current request's parameters go, and how many blocks of them
  // the parts before the last reply brought.
  absl::Span<float> decode_into_;
  int64_t decoded_blocks_ = 0;
  ClientMessage request_;
  ClientMessage push_;
  ServerMessage reply_;
};

// Runs one function per shard in parallel on long-lived threads (one per
// shard), so a step neither creates threads nor allocates. Thread-safe for
// one caller.
class ShardLanes {
 public:
  explicit ShardLanes(int num_shards) : num_shards_(num_shards) {
    for (int s = 0; s < num_shards; ++s) {
      threads_.emplace_back([this, s] { Loop(s); });
    }
  }
  ~ShardLanes() {
    {
      absl::MutexLock lock(&mu_);
      stop_ = true;
    }
    for (std::thread& t : threads_) t.join();
  }

  // Calls fn(s) for every shard and returns the first error by shard order.
  // The caller's thread serves shard 0 (one hand-off fewer).
  absl::Status Run(const std::function<absl::Status(int)>& fn) {
    Dispatch(&fn, 1);
    results_[0] = fn(0);
    return Wait();
  }

  // Starts fn(s) for every shard on the lanes and returns at once; Wait()
  // collects them. `fn` must outlive the Wait().
  void Start(const std::function<absl::Status(int)>* fn) { Dispatch(fn, 0); }

  // Waits for the shards Run or Start began; the first error by shard order.
  absl::Status Wait() {
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](int* pending) { return *pending == 0; }, &pending_));
      task_ = nullptr;
    }
    for (const absl::Status& s : results_) {
      if (!s.ok()) return s;
    }
    return absl::OkStatus();
  }

 private:
  void Dispatch(const std::function<absl::Status(int)>* fn, int first_lane) {
    results_.assign(num_shards_, absl::OkStatus());
    absl::MutexLock lock(&mu_);
    task_ = fn;
    first_lane_ = first_lane;
    pending_ = num_shards_ - first_lane;
    ++generation_;
  }

  void Loop(int shard) {
    int64_t seen = 0;
    while (true) {
      const std::function<absl::Status(int)>* task;
      {
        absl::MutexLock lock(&mu_);
        // A lane the caller serves itself (Run's shard 0) is not woken.
        auto woken = [this, &seen, shard]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return stop_ || (generation_ != seen && shard >= first_lane_);
        };
        mu_.Await(absl::Condition(&woken));
        if (stop_) return;
        seen = generation_;
        task = task_;
      }
      absl::Status s = (*task)(shard);
      absl::MutexLock lock(&mu_);
      results_[shard] = std::move(s);
      --pending_;
    }
  }

  const int num_shards_;
  std::vector<std::thread> threads_;
  absl::Mutex mu_;
  const std::function<absl::Status(int)>* task_ ABSL_GUARDED_BY(mu_) = nullptr;
  int64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  int first_lane_ ABSL_GUARDED_BY(mu_) = 0;
  int pending_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  // Written by each lane for its own index only.
  std::vector<absl::Status> results_;
};

class GrpcParameterClient final : public ParameterClient {
 public:
  GrpcParameterClient(const Partition& partition,
                      std::vector<std::unique_ptr<ShardStream>> shards)
      : partition_(partition),
        shards_(std::move(shards)),
        versions_(shards_.size()),
        acks_(shards_.size()),
        sent_(shards_.size()),
        read_(shards_.size()),
        lanes_(static_cast<int>(shards_.size())) {
    // Which shards hold a block of each parameter, and how many distinct
    // parameters each shard waits for in the split form.
    int num_params = 0;
    for (const BlockInfo& b : partition_.blocks()) {
      num_params = std::max(num_params, b.param_index + 1);
    }
    param_shards_.resize(num_params);
    for (const BlockInfo& b : partition_.blocks()) {
      std::vector<int>& owners = param_shards_[b.param_index];
      if (std::find(owners.begin(), owners.end(), b.shard) == owners.end()) {
        owners.push_back(b.shard);
      }
    }
    shard_params_.assign(shards_.size(), 0);
    for (const std::vector<int>& owners : param_shards_) {
      for (int s : owners) ++shard_params_[s];
    }
    param_ready_.assign(num_params, 0);
    shard_waiting_.assign(shards_.size(), 0);
    split_task_ = [this](int s) { return SplitLane(s); };
  }

  ~GrpcParameterClient() override { AbortPushAndPull(); }

  absl::StatusOr<int64_t> Pull(int64_t step, absl::Span<float> params) override {
    TESSERA_RETURN_IF_ERROR(CheckIdle());
    TESSERA_RETURN_IF_ERROR(CheckSize(params.size()));
    TESSERA_RETURN_IF_ERROR(lanes_.Run([&](int s) {
      return shards_[s]->Pull(step, params, &versions_[s]);
    }));
    return *std::min_element(versions_.begin(), versions_.end());
  }

  int64_t resume_step() const override {
    int64_t step = INT64_MAX;
    for (const auto& s : shards_) step = std::min(step, s->worker_clock());
    return shards_.empty() ? 0 : step;
  }

  int64_t payload_bytes() const override {
    int64_t total = 0;
    for (const auto& s : shards_) total += s->payload_bytes();
    return total;
  }

  absl::StatusOr<PushPullResult> PushAndPull(int64_t step, absl::Span<const float> grads,
                                             absl::Span<float> params) override {
    TESSERA_RETURN_IF_ERROR(CheckIdle());
    TESSERA_RETURN_IF_ERROR(CheckSize(grads.size()));
    TESSERA_RETURN_IF_ERROR(CheckSize(params.size()));
    // Where every shard's payloads go through shared memory, the messages
    // are small: this thread writes every shard's push, then reads every
    // reply, sparing the hand-off to the lane threads while the servers
    // still work in parallel. The development VM's Fashion-MNIST job (2
    // servers, 2 workers, 2 cores, five alternating 10-epoch runs) ran
    // 181-184k samples/s against 171-178k on the lanes. (Both shards
    // one after the other ran 188-191k there, but that serialises the
    // servers' steps, which larger shards on more cores would feel.) On
    // the stream, large pushes to several servers go out in parallel on
    // the lanes.
    bool all_through_region = true;
    for (const auto& shard : shards_) all_through_region &= shard->through_region();
    if (all_through_region && shards_.size() > 1) {
      for (size_t s = 0; s < shards_.size(); ++s) {
        acks_[s] = PushAck();
        sent_[s] = shards_[s]->SendPushAndPull(step, grads);
      }
      // Every reply is read before any shard retries, so a server that is
      // down holds up the others' replies no longer than one failed read.
      for (size_t s = 0; s < shards_.size(); ++s) {
        if (sent_[s].ok()) read_[s] = shards_[s]->ReadPushAndPull(params);
      }
      absl::Status first;
      for (size_t s = 0; s < shards_.size(); ++s) {
        if (sent_[s].ok()) {
          sent_[s] =
              shards_[s]->FinishPushAndPull(std::move(read_[s]), params, &acks_[s], &versions_[s]);
        }
        if (first.ok()) first = sent_[s];
      }
      TESSERA_RETURN_IF_ERROR(first);
      return Result();
    }
    TESSERA_RETURN_IF_ERROR(lanes_.Run([&](int s) {
      acks_[s] = PushAck();
      return shards_[s]->PushAndPull(step, grads, params, &acks_[s], &versions_[s]);
    }));
    return Result();
  }

  int64_t early_pushes() const override {
    absl::MutexLock lock(&ready_mu_);
    return early_pushes_;
  }

  absl::Status StartPushAndPull(int64_t step, absl::Span<const float> grads,
                                absl::Span<float> params) override {
    TESSERA_RETURN_IF_ERROR(CheckIdle());
    TESSERA_RETURN_IF_ERROR(CheckSize(grads.size()));
    TESSERA_RETURN_IF_ERROR(CheckSize(params.size()));
    split_step_ = step;
    split_grads_ = grads;
    split_params_ = params;
    {
      absl::MutexLock lock(&ready_mu_);
      aborted_ = false;
      std::fill(param_ready_.begin(), param_ready_.end(), 0);
      unready_ = static_cast<int>(param_ready_.size());
      shard_waiting_ = shard_params_;
    }
    armed_ = true;
    lanes_.Start(&split_task_);
    return absl::OkStatus();
  }

  void MarkParamReady(int param_index) override {
    absl::MutexLock lock(&ready_mu_);
    MarkReadyLocked(param_index);
  }

  absl::StatusOr<PushPullResult> FinishPushAndPull() override {
    if (!armed_) return absl::FailedPreconditionError("FinishPushAndPull without StartPushAndPull");
    {
      absl::MutexLock lock(&ready_mu_);
      for (int p = 0; p < static_cast<int>(param_ready_.size()); ++p) MarkReadyLocked(p);
    }
    armed_ = false;
    TESSERA_RETURN_IF_ERROR(lanes_.Wait());
    return Result();
  }

  void AbortPushAndPull() override {
    if (!armed_) return;
    {
      absl::MutexLock lock(&ready_mu_);
      aborted_ = true;
    }
    armed_ = false;
    lanes_.Wait().IgnoreError();
  }

 private:
  absl::Status CheckSize(size_t n) const {
    if (static_cast<int64_t>(n) != partition_.total_elements()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "buffer has ", n, " elements, the model has ", partition_.total_elements()));
    }
    return absl::OkStatus();
  }

  // The split form's lanes own the streams until Finish or Abort.
  absl::Status CheckIdle() const {
    if (armed_) {
      return absl::FailedPreconditionError(
          "an exchange begun with StartPushAndPull is under way (finish or abort it first)");
    }
    return absl::OkStatus();
  }

  PushPullResult Result() const {
    PushPullResult r;
    for (const PushAck& a : acks_) {
      r.not_applied += a.applied ? 0 : 1;
      r.late += !a.applied && a.late ? 1 : 0;
    }
    r.version = *std::min_element(versions_.begin(), versions_.end());
    return r;
  }

  void MarkReadyLocked(int param_index) ABSL_EXCLUSIVE_LOCKS_REQUIRED(ready_mu_) {
    if (param_index < 0 || param_index >= static_cast<int>(param_ready_.size()) ||
        param_ready_[param_index]) {
      return;
    }
    param_ready_[param_index] = 1;
    --unready_;
    for (int s : param_shards_[param_index]) --shard_waiting_[s];
  }

  // One shard's part of the split form: waits until every parameter the
  // shard holds is ready (or the exchange is aborted), then pushes and
  // pulls that shard.
  absl::Status SplitLane(int s) {
    // On the stream, part by part: each parameter's blocks leave once
    // backward is done with it, last layer first. Otherwise the shard
    // leaves whole once all of its parameters are ready.
    bool first = true;
    std::function<bool(int)> wait;
    if (shards_[s]->pushes_on_stream()) {
      wait = [this, &first](int param) {
        absl::MutexLock lock(&ready_mu_);
        auto go = [this, param]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(ready_mu_) {
          return aborted_ || param_ready_[param] != 0;
        };
        ready_mu_.Await(absl::Condition(&go));
        if (aborted_) return false;
        if (first && unready_ > 0) ++early_pushes_;  // the first part leaves during backward
        first = false;
        return true;
      };
    } else {
      absl::MutexLock lock(&ready_mu_);
      auto go = [this, s]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(ready_mu_) {
        return aborted_ || shard_waiting_[s] == 0;
      };
      ready_mu_.Await(absl::Condition(&go));
      if (aborted_) return absl::CancelledError("exchange aborted before this shard left");
      if (unready_ > 0) ++early_pushes_;  // backward is still going on
    }
    acks_[s] = PushAck();
    return shards_[s]->PushAndPull(split_step_, split_grads_, split_params_, &acks_[s],
                                   &versions_[s], std::move(wait));
  }

  const Partition& partition_;
  std::vector<std::unique_ptr<ShardStream>> shards_;
  // The split form's exchange (StartPushAndPull until Finish or Abort).
  // Written by the caller before the lanes start and read by them after.
  int64_t split_step_ = 0;
  absl::Span<const float> split_grads_;
  absl::Span<float> split_params_;
  bool armed_ = false;  // the caller's only
  std::function<absl::Status(int)> split_task_;
  std::vector<std::vector<int>> param_shards_;  // shards holding each parameter
  std::vector<int> shard_params_;               // distinct parameters per shard
  mutable absl::Mutex ready_mu_;
  std::vector<char> param_ready_ ABSL_GUARDED_BY(ready_mu_);
  std::vector<int> shard_waiting_ ABSL_GUARDED_BY(ready_mu_);
  bool aborted_ ABSL_GUARDED_BY(ready_mu_) = false;
  int unready_ ABSL_GUARDED_BY(ready_mu_) = 0;  // parameters not yet ready
  int64_t early_pushes_ ABSL_GUARDED_BY(ready_mu_) = 0;

  // Written by each lane for its own index only.
  std::vector<int64_t> versions_;
  std::vector<PushAck> acks_;
  // Per shard, the one-thread exchange's outcome so far and its first read.
  std::vector<absl::Status> sent_;
  std::vector<absl::Status> read_;
  // Declared after everything the lanes' tasks touch, so the lanes stop
  // first when the client is destroyed.
  ShardLanes lanes_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ParameterClient>> CreateGrpcParameterClient(
    const Partition& partition, const GrpcClientOptions& options) {
  if (static_cast<int>(options.servers.size()) != partition.num_shards()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--servers lists ", options.servers.size(),
        " addresses but job.num_shards is ", partition.num_shards()));
  }
  std::vector<std::unique_ptr<ShardStream>> shards;
  for (int s = 0; s < partition.num_shards(); ++s) {
    auto stream = std::make_unique<ShardStream>(s, options.servers[s], partition);
    TESSERA_RETURN_IF_ERROR(stream->Open(options));
    shards.push_back(std::move(stream));
  }
  return std::unique_ptr<ParameterClient>(
      new GrpcParameterClient(partition, std::move(shards)));
}

}  // namespace tessera
