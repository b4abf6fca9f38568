#!/usr/bin/env bash
# The one kubelet change the single-node cluster needs, as a `go build
# -overlay`: usage kubelet-oom.sh <kubernetes tree> <out dir>; writes patched
# copies of two dockershim files and <out dir>/overlay.json.
#
# Why: root on the CI machines lacks CAP_SYS_RESOURCE, so the kernel refuses
# any negative oom_score_adj and runc fails every container that asks for one
# ("can't get final child's PID from pipe: EOF"). Dockershim asks -998 for
# every pod sandbox and -997 for Guaranteed pods. With the change sandboxes get
# 0 and only positive adjustments (Burstable 2..999, BestEffort 1000) are
# passed on, which is everything the kernel allows here.
set -euo pipefail

tree=$1 out=$2
mkdir -p "$out"
dir=pkg/kubelet/dockershim

patch_file() { # file sed-expression must-match-after
    local rel=$1 expr=$2 check=$3
    sed -E "$expr" "$tree/$rel" >"$out/$(basename "$rel")"
    grep -qE "$check" "$out/$(basename "$rel")" || {
        echo "kubelet-oom.sh: the change to $rel did not apply (is this kubernetes 1.20?)" >&2
        exit 1
    }
}

patch_file "$dir/docker_sandbox.go" \
    's/^(\s*defaultSandboxOOMAdj\s+int\s*=\s*)-998/\10/' \
    'defaultSandboxOOMAdj\s+int\s*=\s*0$'
patch_file "$dir/helpers_linux.go" \
    's/^(\s*)createConfig\.HostConfig\.OomScoreAdj = int\(rOpts\.OomScoreAdj\)$/\1if rOpts.OomScoreAdj > 0 {\n\1\tcreateConfig.HostConfig.OomScoreAdj = int(rOpts.OomScoreAdj)\n\1}/' \
    'if rOpts\.OomScoreAdj > 0 \{'

# go matches overlay paths literally: name the files both through the GOPATH
# symlink the build runs in and through their real location.
real=$(readlink -f "$tree")
{
    echo '{"Replace": {'
    sep=
    for f in docker_sandbox.go helpers_linux.go; do
        for base in "$tree" "$real"; do
            printf '%s"%s": "%s"' "$sep" "$base/$dir/$f" "$out/$f"
            sep=$',\n'
        done
    done
    echo
    echo '}}'
} >"$out/overlay.json"
