#include "common/session_stream.h"

#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

using tessera::v1::ClientMessage;
using tessera::v1::TensorBlock;
using ::testing::HasSubstr;

std::string Flatten(const grpc::ByteBuffer& bb, std::vector<grpc::Slice>* slices) {
  EXPECT_TRUE(bb.Dump(slices).ok());
  std::string out;
  for (const grpc::Slice& s : *slices) {
    out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return out;
}

std::string Bytes(size_t n, char seed) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>(seed + 7 * i);
  return s;
}

// The encoder writes every field of these messages by hand: a field added to
// the protocol must be added there too (and here).
TEST(PushSerializerTest, KnowsEveryFieldOfThePushMessages) {
  EXPECT_EQ(ClientMessage::descriptor()->field_count(), 4);
  EXPECT_EQ(tessera::v1::PushRequest::descriptor()->field_count(), 5);
  EXPECT_EQ(TensorBlock::descriptor()->field_count(), 7);
}

TEST(PushSerializerTest, WritesTheBytesProtobufWouldWithPayloadsSpliced) {
  PushSerializer serializer;
  const std::string big = Bytes(3 * kMinZeroCopyPayload + 5, 1);
  const std::string big2 = Bytes(kMinZeroCopyPayload, 2);
  const absl::Span<char> area = serializer.Allocate(big.size() + big2.size());
  std::memcpy(area.data(), big.data(), big.size());
  std::memcpy(area.data() + big.size(), big2.data(), big2.size());

  ClientMessage m;
  m.set_request_id(300);
  tessera::v1::PushRequest* push = m.mutable_push();
  push->set_step(-3);  // negative: a ten-byte varint
  push->set_return_parameters(true);
  push->set_base_version(1LL << 40);
  push->set_more_parts(true);
  TensorBlock* b0 = push->add_blocks();  // payload from the area
  b0->set_block_id(0);
  b0->set_dtype(tessera::v1::F32);
  TensorBlock* b1 = push->add_blocks();  // small payload of its own
  b1->set_block_id(129);
  b1->set_dtype(tessera::v1::BF16);
  b1->set_data(Bytes(10, 3));
  TensorBlock* b2 = push->add_blocks();  // sparse, every trailing field set
  b2->set_block_id(7);
  b2->set_dtype(tessera::v1::F32);
  b2->set_sparse(true);
  b2->set_indices(Bytes(200, 4));
  b2->set_shm_offset(1ULL << 33);
  b2->set_shm_size(77);
  TensorBlock* b3 = push->add_blocks();  // large payload of its own: copied
  b3->set_block_id(8);
  b3->set_dtype(tessera::v1::F32);
  b3->set_data(Bytes(2 * kMinZeroCopyPayload, 5));
  TensorBlock* b4 = push->add_blocks();  // second payload from the area
  b4->set_block_id(9);
  b4->set_dtype(tessera::v1::F32);
  push->add_blocks();  // empty block

  const std::vector<absl::string_view> payloads = {
      absl::string_view(area.data(), big.size()), {}, {}, {},
      absl::string_view(area.data() + big.size(), big2.size()), {}};
  grpc::ByteBuffer bb;
  ASSERT_TRUE(serializer.Serialize(m, payloads, &bb).ok());

  ClientMessage expected = m;
  expected.mutable_push()->mutable_blocks(0)->set_data(big);
  expected.mutable_push()->mutable_blocks(4)->set_data(big2);
  std::vector<grpc::Slice> slices;
  const std::string wire = Flatten(bb, &slices);
  EXPECT_EQ(wire, expected.SerializeAsString());
  ClientMessage parsed;
  ASSERT_TRUE(parsed.ParseFromString(wire));
  EXPECT_EQ(parsed.SerializeAsString(), expected.SerializeAsString());

  // Both area payloads went as slices of the area itself; the large
  // payload of the message's own was copied.
  int in_area = 0;
  for (const grpc::Slice& s : slices) {
    const char* p = reinterpret_cast<const char*>(s.begin());
    if (p >= area.data() && p < area.data() + area.size()) ++in_area;
    EXPECT_NE(p, b3->data().data());
  }
  EXPECT_EQ(in_area, 2);
  EXPECT_EQ(serializer.buffers_held_by_grpc(), 1);
  slices.clear();
  bb.Clear();
  EXPECT_EQ(serializer.buffers_held_by_grpc(), 0);
}

TEST(PushSerializerTest, APartCarriesItsBlocksAndTheMoreFlag) {
  PushSerializer serializer;
  const size_t n = 2 * kMinZeroCopyPayload;
  const absl::Span<char> area = serializer.Allocate(3 * n);
  ClientMessage m;
  m.set_request_id(5);
  m.mutable_push()->set_step(11);
  m.mutable_push()->set_return_parameters(true);
  std::vector<absl::string_view> payloads;
  for (int i = 0; i < 3; ++i) {
    std::memset(area.data() + i * n, 'a' + i, n);
    TensorBlock* b = m.mutable_push()->add_blocks();
    b->set_block_id(i);
    b->set_dtype(tessera::v1::F32);
    payloads.emplace_back(area.data() + i * n, n);
  }
  for (const auto& [begin, end, more] :
       {std::make_tuple(0, 2, true), std::make_tuple(2, 3, false)}) {
    grpc::ByteBuffer bb;
    ASSERT_TRUE(serializer.SerializePart(m, payloads, begin, end, more, &bb).ok());
    ClientMessage expected;
    expected.set_request_id(5);
    expected.mutable_push()->set_step(11);
    expected.mutable_push()->set_return_parameters(true);
    expected.mutable_push()->set_more_parts(more);
    for (int i = begin; i < end; ++i) {
      TensorBlock* b = expected.mutable_push()->add_blocks();
      *b = m.push().blocks(i);
      b->set_data(std::string(n, static_cast<char>('a' + i)));
    }
    std::vector<grpc::Slice> slices;
    EXPECT_EQ(Flatten(bb, &slices), expected.SerializeAsString()) << begin;
  }
  grpc::ByteBuffer bb;
  EXPECT_FALSE(serializer.SerializePart(m, payloads, 2, 4, false, &bb).ok());
  EXPECT_FALSE(serializer.SerializePart(m, payloads, 2, 1, false, &bb).ok());
}

TEST(PushSerializerTest, AnEmptyPushMatchesProtobuf) {
  PushSerializer serializer;
  ClientMessage m;
  m.mutable_push();
  grpc::ByteBuffer bb;
  ASSERT_TRUE(serializer.Serialize(m, {}, &bb).ok());
  std::vector<grpc::Slice> slices;
  EXPECT_EQ(Flatten(bb, &slices), m.SerializeAsString());
  EXPECT_EQ(m.SerializeAsString().size(), 2u);  // the push field, empty
}

TEST(PushSerializerTest, NeverHandsOutABufferGrpcStillHolds) {
  PushSerializer serializer;
  const size_t n = 4 * kMinZeroCopyPayload;
  absl::Span<char> first = serializer.Allocate(n);
  std::memset(first.data(), 1, n);
  ClientMessage m;
  m.mutable_push()->add_blocks()->set_dtype(tessera::v1::F32);
  const std::vector<absl::string_view> payloads = {absl::string_view(first.data(), n)};
  auto held = std::make_unique<grpc::ByteBuffer>();
  ASSERT_TRUE(serializer.Serialize(m, payloads, held.get()).ok());

  // While gRPC holds the first buffer, the next push gets other memory.
  absl::Span<char> second = serializer.Allocate(n);
  EXPECT_NE(second.data(), first.data());
  EXPECT_EQ(serializer.buffers_held_by_grpc(), 1);
  // Rewriting the new buffer leaves the bytes gRPC holds alone.
  std::memset(second.data(), 2, n);
  std::vector<grpc::Slice> slices;
  const std::string wire = Flatten(*held, &slices);
  EXPECT_EQ(wire.substr(wire.size() - n), std::string(n, '\1'));
  slices.clear();

  // Once released, a buffer is reused: its pages stay warm.
  held.reset();
  EXPECT_EQ(serializer.buffers_held_by_grpc(), 0);
  absl::Span<char> third = serializer.Allocate(n);
  EXPECT_TRUE(third.data() == first.data() || third.data() == second.data());
}

TEST(PushSerializerTest, ABufferOutlivesTheSerializerWhileGrpcHoldsIt) {
  auto serializer = std::make_unique<PushSerializer>();
  const size_t n = 2 * kMinZeroCopyPayload;
  absl::Span<char> area = serializer->Allocate(n);
  std::memset(area.data(), 9, n);
  ClientMessage m;
  m.mutable_push()->add_blocks();
  const std::vector<absl::string_view> payloads = {absl::string_view(area.data(), n)};
  grpc::ByteBuffer bb;
  ASSERT_TRUE(serializer->Serialize(m, payloads, &bb).ok());
  serializer.reset();
  std::vector<grpc::Slice> slices;
  const std::string wire = Flatten(bb, &slices);  // still readable (ASan checks)
  EXPECT_EQ(wire.substr(wire.size() - n), std::string(n, '\x09'));
}

TEST(PushSerializerTest, RefusesWhatItCannotFrame) {
  PushSerializer serializer;
  grpc::ByteBuffer bb;
  ClientMessage no_push;
  no_push.mutable_pull();
  EXPECT_THAT(std::string(serializer.Serialize(no_push, {}, &bb).message()),
              HasSubstr("a push and nothing else"));
  ClientMessage with_hello;
  with_hello.mutable_push();
  with_hello.mutable_hello();
  EXPECT_FALSE(serializer.Serialize(with_hello, {}, &bb).ok());

  ClientMessage two_blocks;
  two_blocks.mutable_push()->add_blocks();
  two_blocks.mutable_push()->add_blocks();
  const std::vector<absl::string_view> one = {absl::string_view("x")};
  EXPECT_THAT(std::string(serializer.Serialize(two_blocks, one, &bb).message()),
              HasSubstr("2 blocks with 1 payloads"));

  // A field this encoder does not know (say, from a newer peer) would be lost.
  ClientMessage unknown;
  ASSERT_TRUE(unknown.ParseFromString(std::string("\x1a\x03\xa0\x06\x01", 5)));  // push.field 100
  EXPECT_THAT(std::string(serializer.Serialize(unknown, {}, &bb).message()),
              HasSubstr("unknown fields"));
}

}  // namespace
}  // namespace tessera
