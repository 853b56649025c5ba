#include "common/credentials.h"

#include <fstream>
#include <map>
#include <sstream>

#include <grpcpp/security/auth_metadata_processor.h>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace tessera {
namespace {

constexpr char kRoleProperty[] = "tessera-role";

absl::StatusOr<std::string> ReadSecretFile(const std::string& flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, ": cannot read '", path, "'"));
  }
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

absl::StatusOr<std::string> ReadToken(const std::string& flag, const std::string& path) {
  TESSERA_ASSIGN_OR_RETURN(std::string token, ReadSecretFile(flag, path));
  token = std::string(absl::StripAsciiWhitespace(token));
  // The token itself never appears in a message: only where it came from.
  if (token.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, ": '", path, "' is empty"));
  }
  if (token.find_first_of(" \t\r\n") != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, ": '", path, "' holds more than one word"));
  }
  return token;
}

// Checks the bearer token of every call before any handler runs, and marks
// admin calls in the auth context. Thread-safe: immutable.
class TokenProcessor : public grpc::AuthMetadataProcessor {
 public:
  TokenProcessor(std::string token, std::string admin_token)
      : token_(std::move(token)), admin_token_(std::move(admin_token)) {}

  bool IsBlocking() const override { return false; }

  grpc::Status Process(const InputMetadata& metadata, grpc::AuthContext* context,
                       OutputMetadata* consumed, OutputMetadata* response) override {
    auto it = metadata.find("authorization");
    if (it == metadata.end()) {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "missing bearer token");
    }
    const std::string value(it->second.data(), it->second.size());
    const std::string prefix = "Bearer ";
    const std::string presented =
        absl::StartsWith(value, prefix) ? value.substr(prefix.size()) : std::string();
    std::string role;
    if (!admin_token_.empty() && Equal(presented, admin_token_)) {
      role = "admin";
    } else if (!token_.empty() && Equal(presented, token_)) {
      role = "worker";
    } else {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "invalid bearer token");
    }
    consumed->insert({std::string(it->first.data(), it->first.size()), value});
    context->AddProperty(kRoleProperty, role);
    return grpc::Status::OK;
  }

 private:
  // Compares in time independent of where the strings differ.
  static bool Equal(const std::string& a, const std::string& b) {
    if (a.size() != b.size()) return false;
    unsigned char diff = 0;
    for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
    return diff == 0;
  }

  const std::string token_;
  const std::string admin_token_;
};

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const SecurityFiles& files) {
  const bool tls = !files.cert.empty() || !files.key.empty();
  const bool tokens = !files.token.empty() || !files.admin_token.empty();
  if (!tls) {
    if (!files.ca.empty()) {
      return absl::InvalidArgumentError("--tls_ca needs --tls_cert and --tls_key");
    }
    if (tokens) {
      return absl::InvalidArgumentError(
          "--token_file/--admin_token_file need --tls_cert and --tls_key: gRPC sends "
          "tokens only over TLS");
    }
    return grpc::InsecureServerCredentials();
  }
  if (files.cert.empty()) return absl::InvalidArgumentError("--tls_key needs --tls_cert");
  if (files.key.empty()) return absl::InvalidArgumentError("--tls_cert needs --tls_key");
  grpc::SslServerCredentialsOptions options(
      files.ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                       : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  TESSERA_ASSIGN_OR_RETURN(pair.cert_chain, ReadSecretFile("tls_cert", files.cert));
  TESSERA_ASSIGN_OR_RETURN(pair.private_key, ReadSecretFile("tls_key", files.key));
  options.pem_key_cert_pairs.push_back(pair);
  if (!files.ca.empty()) {
    TESSERA_ASSIGN_OR_RETURN(options.pem_root_certs, ReadSecretFile("tls_ca", files.ca));
  }
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::SslServerCredentials(options);
  if (creds == nullptr) {
    return absl::InvalidArgumentError("--tls_cert/--tls_key: not a usable certificate and key");
  }
  if (tokens) {
    std::string token, admin;
    if (!files.token.empty()) {
      TESSERA_ASSIGN_OR_RETURN(token, ReadToken("token_file", files.token));
    }
    if (!files.admin_token.empty()) {
      TESSERA_ASSIGN_OR_RETURN(admin, ReadToken("admin_token_file", files.admin_token));
    }
    creds->SetAuthMetadataProcessor(std::make_shared<TokenProcessor>(token, admin));
  }
  return creds;
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const SecurityFiles& files, bool admin) {
  const std::string& token_path = admin ? files.admin_token : files.token;
  const bool tls = !files.ca.empty() || !files.cert.empty();
  if (!tls) {
    if (!token_path.empty()) {
      return absl::InvalidArgumentError(
          "--token_file/--admin_token_file need --tls_ca: gRPC sends tokens only over TLS");
    }
    return grpc::InsecureChannelCredentials();
  }
  grpc::SslCredentialsOptions options;
  if (!files.ca.empty()) {
    TESSERA_ASSIGN_OR_RETURN(options.pem_root_certs, ReadSecretFile("tls_ca", files.ca));
  }
  if (!files.cert.empty() || !files.key.empty()) {
    if (files.cert.empty() || files.key.empty()) {
      return absl::InvalidArgumentError("a client certificate needs both --tls_cert and --tls_key");
    }
    TESSERA_ASSIGN_OR_RETURN(options.pem_cert_chain, ReadSecretFile("tls_cert", files.cert));
    TESSERA_ASSIGN_OR_RETURN(options.pem_private_key, ReadSecretFile("tls_key", files.key));
  }
  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::SslCredentials(options);
  if (!token_path.empty()) {
    TESSERA_ASSIGN_OR_RETURN(
        std::string token, ReadToken(admin ? "admin_token_file" : "token_file", token_path));
    creds = grpc::CompositeChannelCredentials(creds, grpc::AccessTokenCredentials(token));
  }
  return creds;
}

bool IsAdminCall(const grpc::ServerContext& context) {
  std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  if (auth == nullptr) return true;
  const std::vector<grpc::string_ref> roles = auth->FindPropertyValues(kRoleProperty);
  if (roles.empty()) return true;  // no token checking on this server
  return std::string(roles[0].data(), roles[0].size()) == "admin";
}

}  // namespace tessera
