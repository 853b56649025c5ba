// Transport security: TLS or mutual TLS from PEM files, and bearer tokens
// checked on every call. gRPC sends call credentials only over TLS, so a
// token without TLS is refused at start-up rather than silently unused.

#ifndef TESSERA_COMMON_CREDENTIALS_H_
#define TESSERA_COMMON_CREDENTIALS_H_

#include <memory>
#include <string>

#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_context.h>

#include "absl/status/statusor.h"

namespace tessera {

// File names as given on the command line; empty means not used.
struct SecurityFiles {
  std::string ca;           // server: CA that signs client certificates (mTLS);
                            // client: CA that signs the server's certificate
  std::string cert;         // this side's certificate chain
  std::string key;          // this side's private key
  std::string token;        // bearer token of workers and servers
  std::string admin_token;  // bearer token for admin calls (checkpoint)
};

// Server credentials: plaintext when no certificate is given; TLS with
// cert+key; mutual TLS when a CA is given too (clients without a
// certificate signed by it cannot connect). With tokens, every call must
// carry "authorization: Bearer <token or admin token>"; others fail with
// UNAUTHENTICATED before reaching a handler. Errors name the flag or file:
// a token without TLS, a key without a certificate, an unreadable file.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const SecurityFiles& files);

// Channel credentials matching MakeServerCredentials. With `admin`, the
// admin token is sent instead of the worker token.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const SecurityFiles& files, bool admin = false);

// Whether the call was authenticated with the admin token. True on servers
// that check no tokens at all (nothing to distinguish).
bool IsAdminCall(const grpc::ServerContext& context);

}  // namespace tessera

#endif  // TESSERA_COMMON_CREDENTIALS_H_
