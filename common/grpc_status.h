// The one place where absl::Status and grpc::Status meet. Both use the
// canonical google.rpc.Code numbering, so conversion keeps the code.

#ifndef TESSERA_COMMON_GRPC_STATUS_H_
#define TESSERA_COMMON_GRPC_STATUS_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace tessera {

// Converts an Abseil status into a gRPC status with the same code and message.
grpc::Status ToGrpcStatus(const absl::Status& status);

// Converts a gRPC status into an Abseil status with the same code and message.
absl::Status FromGrpcStatus(const grpc::Status& status);

// Builds an Abseil status from a numeric google.rpc.Code and a message, as
// carried inside stream messages. Unknown numbers become kUnknown.
absl::Status StatusFromCode(int code, absl::string_view message);

}  // namespace tessera

#endif  // TESSERA_COMMON_GRPC_STATUS_H_
