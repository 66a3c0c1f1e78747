# Shared by scripts/build-control-plane and scripts/build-node (sourced, not run): how we
# compile upstream servers from the Go module proxy into a version-keyed cache. The
# machines reach package registries only, so no release tarballs: every binary is
# compiled from its Go module at a pinned version.
#
# Environment knobs:
#   AGENTSTUDIO_CACHE     where binaries are cached (default ~/.cache/agentstudio)
#   AGENTSTUDIO_BUILD_P   `go build -p N` (default: one job per core)

CACHE=${AGENTSTUDIO_CACHE:-$HOME/.cache/agentstudio}
LOG_NAME=${LOG_NAME:-$(basename "$0")}

log() { echo "$LOG_NAME: $*" >&2; }

# Called once something must be built: checks Go, sets the build flags and a work dir.
go_build_prepare() {
    command -v go >/dev/null || { log "Go >= 1.26 is required to build the servers the tests run (https://go.dev/dl/)"; exit 1; }
    log "building the missing binaries into $CACHE from the Go module proxy: only the first run pays"
    # Static binaries, as upstream ships them. GOTOOLCHAIN=local: etcd's go.mod carries a
    # `toolchain` line newer than our Go; never let the go command fetch a toolchain behind
    # our back, fail loudly instead if a pin ever needs a newer Go.
    export CGO_ENABLED=0 GOTOOLCHAIN=local
    # Measured on 2 cores: the largest process (a kube link) peaks at ~1.8 GiB and the whole
    # build under ~2 GiB, so on our 24 GiB machines Go's default (one job per core) is safe
    # and ~20% faster than -p 1. On a small box set AGENTSTUDIO_BUILD_P=1.
    # -trimpath: no paths of this machine inside.
    GO_FLAGS=(-trimpath)
    [[ -z ${AGENTSTUDIO_BUILD_P:-} ]] || GO_FLAGS+=(-p "$AGENTSTUDIO_BUILD_P")
    GO_BUILD=(go build "${GO_FLAGS[@]}")
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/$LOG_NAME.XXXXXX")
    TICKER=  # the heartbeat of the build under way, if any
    trap 'rm -rf "$WORK"; [[ -z $TICKER ]] || kill "$TICKER" 2>/dev/null' EXIT
}

# A wrapper module: `go install pkg@version` refuses modules whose go.mod has replace
# lines (kubernetes, etcd), and as a dependency those lines are ignored, so the wrapper
# must supply what they did. The `tool` directive keeps the requirement through
# `go mod tidy` and lets us build upstream main packages without a main.go.
new_wrapper() { # dir tool-package...
    local dir=$1 pkg
    shift
    mkdir -p "$dir"
    printf 'module agentstudio.local/%s\n\ngo 1.26.0\n' "$(basename "$dir")" >"$dir/go.mod"
    for pkg in "$@"; do (cd "$dir" && go mod edit -tool="$pkg"); done
}

# A wrapper module requiring k8s.io/kubernetes at $KUBE_VERSION, for its cmd/ packages.
kube_wrapper() ( # dir cmd-package...
    local dir=$1 minor patch staging m
    new_wrapper "$@"
    cd "$dir"
    go mod edit -require="k8s.io/kubernetes@$KUBE_VERSION"
    # k8s.io/kubernetes requires its staging modules (k8s.io/api, apiserver, ...) at
    # v0.0.0 and replaces them with ./staging/... paths, which only resolve inside its
    # own repo. Pin each one to its published v0.<minor>.<patch> tag. The list comes
    # from that release's go.mod, so it follows new staging modules between releases.
    IFS=. read -r _ minor patch <<<"${KUBE_VERSION#v}"
    staging=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" |
        sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p' |
        xargs sed -n 's#^[[:space:]]*\(k8s.io/[^[:space:]]*\) => ./staging/.*#\1#p')
    [[ -n $staging ]] || { log "no staging modules found for kubernetes $KUBE_VERSION"; exit 1; }
    for m in $staging; do
        go mod edit -replace="$m=$m@v0.$minor.$patch"
    done
    go mod tidy
)

# Without these a kube binary reports v0.0.0-master+$Format:%H$, and clients that check
# the server version (helm's kubeVersion constraints, the kubelet's skew check) refuse it.
kube_version_ldflags() {
    local minor pkg=k8s.io/component-base/version
    IFS=. read -r _ minor _ <<<"${KUBE_VERSION#v}"
    echo "-X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor" \
        "-X $pkg.gitTreeState=clean -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
}

# Build into a temp name beside the target and rename, so an interrupted build never
# leaves a binary that the fast path would take for a finished one.
install_bin() { # built-file target
    mkdir -p "$(dirname "$2")"
    cp "$1" "$2.tmp.$$"
    chmod 0755 "$2.tmp.$$"
    mv -f "$2.tmp.$$" "$2"
}

# Runs build-function unless target exists, with a heartbeat: go build says nothing
# while it compiles (kube binaries: minutes).
build_if_missing() { # name version target build-function
    if [[ ! -x $3 ]]; then
        log "building $1 $2"
        local start=$SECONDS
        (while sleep 30; do log "still building $1 ($((SECONDS - start))s)"; done) &
        TICKER=$!
        "$4"
        kill "$TICKER"
        TICKER=
        log "$1 $2 built in $((SECONDS - start))s"
    fi
}
