#!/usr/bin/env bash
# Offline checks of deploy/: no container engine or cluster needed.
#
#   npm ci                        # once: the pinned validation tools (package.json)
#   deploy/validate.sh [BIN_DIR]  # BIN_DIR holds the built binaries (default build/bin)
#
# Checks: the Compose files render (docker-compose 1.29 `config -q`, CPU and
# GPU); the Kustomize overlays render (kubectl kustomize); every rendered
# Kubernetes object validates against the schemas of `kubernetes-models`; the
# StatefulSet and Job sizes match the job file; the GPU overlay puts only the
# workers on the CUDA image with a GPU; the two copies of the job file match;
# both Dockerfiles pass dockerfilelint; every flag (and `tessera` subcommand)
# the Compose files and manifests pass to a binary is one that binary accepts
# (`BIN --helpfull`).
# Prints one line per check and a total; exits 1 if any check failed.
set -euo pipefail

caller_dir=$PWD
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bin_dir=${1:-$root/build/bin}  # BIN_DIR relative to the caller's directory
[[ $bin_dir == /* ]] || bin_dir="$caller_dir/$bin_dir"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/tessera-deploy-validate.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

passed=0
failed=0
pass() { printf 'ok   %s\n' "$1"; passed=$((passed + 1)); }
fail() {
  printf 'FAIL %s\n' "$1"
  if [[ -n ${2:-} ]]; then printf '       %s\n' "${2//$'\n'/$'\n'       }"; fi
  failed=$((failed + 1))
}
# check NAME COMMAND...: runs COMMAND, passes if it exits 0, shows its output if not.
check() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then pass "$name"; else fail "$name" "$out"; fi
}
summary() { echo "deploy validation: $passed passed, $failed failed"; }

compose=deploy/compose/docker-compose.yml
compose_gpu=deploy/compose/docker-compose.gpu.yml

# --- tools ------------------------------------------------------------------
missing=()
for tool in docker-compose kubectl node; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [[ ! -x node_modules/.bin/dockerfilelint || ! -d node_modules/kubernetes-models \
      || ! -d node_modules/yaml ]]; then
  missing+=("node_modules (run: npm ci)")
fi
if [[ ${#missing[@]} -gt 0 ]]; then
  fail "tools present" "missing: ${missing[*]}"
  summary
  exit 1
fi
kubectl_version=$(kubectl version --client 2>/dev/null | sed -n 's/^Client Version: //p')
pass "tools present (docker-compose $(docker-compose version --short 2>/dev/null), kubectl ${kubectl_version:-?}, node $(node --version))"

# --- (a) Compose ------------------------------------------------------------
check "compose config: $compose" docker-compose -f "$compose" config -q
check "compose config: $compose + $compose_gpu" \
  docker-compose -f "$compose" -f "$compose_gpu" config -q
docker-compose -f "$compose" config >"$tmp/compose-cpu.yaml" 2>/dev/null || true
docker-compose -f "$compose" -f "$compose_gpu" config >"$tmp/compose-gpu.yaml" 2>/dev/null || true

# --- (b) Kustomize ----------------------------------------------------------
for overlay in cpu gpu; do
  if out=$(kubectl kustomize "deploy/k8s/overlays/$overlay" 2>&1); then
    printf '%s\n' "$out" >"$tmp/k8s-$overlay.yaml"
    pass "kustomize render: deploy/k8s/overlays/$overlay ($(grep -c '^kind:' "$tmp/k8s-$overlay.yaml") objects)"
  else
    fail "kustomize render: deploy/k8s/overlays/$overlay" "$out"
    : >"$tmp/k8s-$overlay.yaml"
  fi
done

# --- (c) Kubernetes schemas and sizes ---------------------------------------
for overlay in cpu gpu; do
  check "k8s schema: overlays/$overlay" node deploy/validate-k8s.mjs validate "$tmp/k8s-$overlay.yaml"
  check "k8s sizes match job file: overlays/$overlay" \
    node deploy/validate-k8s.mjs topology "$tmp/k8s-$overlay.yaml" deploy/k8s/base/job.textproto
done

gpu_layout() {
  local cpu=$tmp/k8s-cpu.yaml gpu=$tmp/k8s-gpu.yaml
  grep -q 'image: tessera-cuda' "$gpu" || { echo "gpu: no worker on the CUDA image"; return 1; }
  grep -q -- '- --device=cuda' "$gpu" || { echo "gpu: no --device=cuda"; return 1; }
  grep -q 'nvidia.com/gpu: 1' "$gpu" || { echo "gpu: no nvidia.com/gpu limit"; return 1; }
  [[ $(grep -c 'image: tessera-cuda' "$gpu") -eq 1 ]] || { echo "gpu: servers on the CUDA image"; return 1; }
  if grep -q 'tessera-cuda\|nvidia.com/gpu\|--device=cuda' "$cpu"; then
    echo "cpu: GPU settings in the CPU overlay"
    return 1
  fi
}
check "k8s overlays: only gpu workers get the CUDA image, --device=cuda and a GPU" gpu_layout

check "job files identical: deploy/compose/job.textproto = deploy/k8s/base/job.textproto" \
  cmp deploy/compose/job.textproto deploy/k8s/base/job.textproto

# --- (d) Dockerfiles --------------------------------------------------------
# The build stage configures the top-level CMakeLists.txt, which stops at an
# add_subdirectory (outside the tests' and fuzzers' conditions) or include
# of a folder the image was not given.
copies_sources() {
  local dockerfile=$1 dir missing=()
  for dir in $(sed -n 's/^add_subdirectory(\([a-z_]*\))$/\1/p' CMakeLists.txt) \
             $(sed -n 's|^include(\([a-z_]*\)/.*|\1|p' CMakeLists.txt); do
    grep -Eq "^COPY ${dir}/ ${dir}/\$" "$dockerfile" || missing+=("$dir/")
  done
  if ((${#missing[@]})); then
    echo "$dockerfile does not COPY ${missing[*]}"
    return 1
  fi
}
for dockerfile in deploy/docker/Dockerfile.cpu deploy/docker/Dockerfile.cuda; do
  if [[ ! -f $dockerfile ]]; then
    # dockerfilelint lints a missing file's name as Dockerfile text: test first.
    fail "dockerfilelint: $dockerfile" "no such file"
  else
    check "dockerfilelint: $dockerfile" node_modules/.bin/dockerfilelint "$dockerfile"
    check "$dockerfile copies every folder CMakeLists.txt always configures" \
      copies_sources "$dockerfile"
  fi
done

# --- (e) flags passed to the binaries ---------------------------------------
{
  node deploy/validate-k8s.mjs commands "$tmp/k8s-cpu.yaml" "$tmp/k8s-gpu.yaml" || true
  node deploy/validate-k8s.mjs compose-commands "$tmp/compose-cpu.yaml" || true
  node deploy/validate-k8s.mjs compose-commands "$tmp/compose-gpu.yaml" || true
} >"$tmp/commands.tsv"

declare -A help_of
help_for() {  # prints BIN --helpfull (cached); fails if BIN is missing
  local bin=$1
  [[ -x $bin_dir/$bin ]] || return 1
  if [[ -z ${help_of[$bin]+set} ]]; then
    help_of[$bin]=$("$bin_dir/$bin" --helpfull 2>&1 || true)
  fi
  printf '%s\n' "${help_of[$bin]}"
}

if ! grep -q '^flag' "$tmp/commands.tsv"; then
  fail "flags: command lines found" "no command lines extracted"
fi
# Malformed command lines first, then each (kind, binary, name) once.
awk -F'\t' '$1 == "error"' "$tmp/commands.tsv" >"$tmp/errors.tsv"
while IFS=$'\t' read -r _ _ message where; do
  fail "command line: $where" "$message"
done <"$tmp/errors.tsv"
awk -F'\t' '$1 != "error" && !seen[$1 FS $2 FS $3]++ {print $1 "\t" $2 "\t" $3}' \
  "$tmp/commands.tsv" >"$tmp/names.tsv"

while IFS=$'\t' read -r what bin name; do
  users=$(awk -F'\t' -v w="$what" -v b="$bin" -v n="$name" \
            '$1==w && $2==b && $3==n {print $4}' "$tmp/commands.tsv" | sort -u | paste -sd ';' -)
  if [[ $what == flag ]]; then label="flag $bin --$name"; else label="subcommand $bin $name"; fi
  if [[ ! $name =~ ^[A-Za-z0-9_-]+$ ]]; then
    fail "$label: not a flag or subcommand name" "used by: $users"
    continue
  fi
  help_file="$tmp/help-$bin.txt"
  if ! help_for "$bin" >"$help_file"; then
    fail "$label: $bin_dir/$bin not found" "used by: $users"
    continue
  fi
  if [[ $what == flag ]]; then
    # Abseil lists each flag as "  --name (help text); default: ...".
    # A boolean may be negated as --noname.
    if grep -Eq -- "^[[:space:]]*--${name}[[:space:]]\(" "$help_file" \
       || { [[ $name == no* ]] && grep -Eq -- "^[[:space:]]*--${name#no}[[:space:]]\(" "$help_file"; }; then
      pass "$label"
    else
      fail "$label: not in '$bin --helpfull'" "used by: $users"
    fi
  else
    # Subcommands appear in the usage text as "  tessera NAME ...".
    if grep -Eq -- "^[[:space:]]*${bin}[[:space:]]+${name}([[:space:]]|$)" "$help_file"; then
      pass "$label"
    else
      fail "$label: not in '$bin --helpfull'" "used by: $users"
    fi
  fi
done <"$tmp/names.tsv"

summary
[[ $failed -eq 0 ]]
