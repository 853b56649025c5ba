#include "common/discovery.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"

namespace tessera {

absl::StatusOr<int> OrdinalFromHostname(absl::string_view hostname) {
  const absl::string_view host = hostname.substr(0, hostname.find('.'));
  const size_t dash = host.rfind('-');
  int ordinal = -1;
  if (dash == absl::string_view::npos || !absl::SimpleAtoi(host.substr(dash + 1), &ordinal) ||
      ordinal < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "hostname '", hostname, "' does not end in -N (a StatefulSet pod ordinal)"));
  }
  return ordinal;
}

absl::StatusOr<int> IndexFromEnvValue(absl::string_view name, const char* value) {
  if (value == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("environment variable ", name, " is not set"));
  }
  int index = -1;
  if (!absl::SimpleAtoi(value, &index) || index < 0) {
    return absl::InvalidArgumentError(absl::StrCat("environment variable ", name, "='", value,
                                                   "' is not a non-negative integer"));
  }
  return index;
}

absl::StatusOr<std::vector<std::string>> ExpandServerPattern(absl::string_view pattern,
                                                              int count) {
  if (pattern.find("{i}") == absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("server pattern '", pattern, "' has no {i} placeholder"));
  }
  if (pattern.rfind(':') == absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("server pattern '", pattern, "' has no :port"));
  }
  std::vector<std::string> out;
  for (int i = 0; i < count; ++i) {
    out.push_back(absl::StrReplaceAll(pattern, {{"{i}", absl::StrCat(i)}}));
  }
  return out;
}

}  // namespace tessera
