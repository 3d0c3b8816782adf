#!/usr/bin/env bash
# The container image built and run for real with podman (make container-test, and
# tests/test_container.py): build the image, serve the embedded model from a fresh volume, ask
# it a question, check its health check, stop it with SIGTERM mid-stream (the stream finishes,
# gunicorn exits 0), start it again on the now-warm volume. The last line printed is JSON with
# the times measured (seconds) and the worker's memory (MiB).
# The local Debian base image is kept between runs (built when absent); the app image is built
# every run (podman's layer cache keeps the steps before the source is copied).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export CONTAINERS_CONF=$here/containers.conf
image=${TEXTGEN_TEST_IMAGE:-textgen:test}
name=textgen-container-test
volume=textgen-container-test-models
# TEXTGEN_COMPILE=0 skips compiling the decoder (1.5-3.5 minutes on a cold volume; nothing in
# it depends on the container): the cold start still converts and quantizes the GGUF into the
# volume, and the warm one loads both from it.
run_env=(-e TEXTGEN_COMPILE=0)
ready_timeout=600
logs=$(mktemp -d /tmp/textgen-container-test.XXXXXX)
script_start=$(date +%s.%N)

now() { date +%s.%N; }
since() { python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$1" "$(now)"; }
say() { echo "container-test: $*" >&2; }
fail() {
  say "FAILED: $*"
  if podman container exists "$name" 2>/dev/null; then
    say "last lines of the container's log:"
    podman logs --tail 40 "$name" 2>&1 | grep -v "systemd connection" >&2 || true
  fi
  exit 1
}
# Without systemd, podman logs an error for every health-check timer it cannot create; the
# checks themselves still run on request (podman healthcheck run).
pm() { podman "$@" 2> >(grep -v "unable to get systemd connection" >&2); }
remove_test_containers() {
  podman rm -f -t 0 "$name" >/dev/null 2>&1 || true
  podman volume rm -f "$volume" >/dev/null 2>&1 || true
}
trap 'remove_test_containers; rm -rf "$logs"' EXIT

install_tools() {
  # As deploy/system.sh: the Debian packages, when missing (root, or sudo).
  local missing=""
  command -v podman >/dev/null || missing="$missing podman"
  command -v runc >/dev/null || missing="$missing runc"
  command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing="$missing debootstrap"
  # The bridge network and published ports (podman's CNI backend, see containers.conf).
  [ -x /usr/lib/cni/bridge ] || missing="$missing containernetworking-plugins"
  [ -z "$missing" ] && return 0
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  say "installing Debian packages:$missing"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends $missing >"$logs/apt.log" 2>&1 \
    || { tail -n 20 "$logs/apt.log" >&2; fail "apt-get install$missing"; }
}

# Start a container on the volume; ready_s: the seconds until /readyz answered 200.
start_server() {
  local started
  started=$(now)
  pm run -d --name "$name" -p 127.0.0.1::8000 -v "$volume:/models" "${run_env[@]}" "$image" \
    >/dev/null || fail "podman run"
  port=$(podman port "$name" 8000/tcp | head -n 1 | sed 's/.*://')
  [ -n "$port" ] || fail "no published port"
  base_url="http://127.0.0.1:$port"
  local deadline=$(($(date +%s) + ready_timeout))
  until [ "$(curl -s -o /dev/null -w '%{http_code}' "$base_url/readyz")" = 200 ]; do
    [ "$(podman inspect -f '{{.State.Running}}' "$name")" = true ] || fail "the container exited"
    [ "$(date +%s)" -lt "$deadline" ] || fail "/readyz not 200 after ${ready_timeout}s"
    sleep 0.5
  done
  ready_s=$(since "$started")
}

# POST /generate; echo the first output's text.
generate() {
  curl -sf -X POST "$base_url/generate" -H 'Content-Type: application/json' -d "$1" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["results"][0]["outputs"][0]["text"])'
}

check_answers() {
  local text
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$base_url/livez")" = 200 ] || fail "/livez"
  text=$(generate '{"prompt":"What is the capital of France?","chat":true,"strategy":"greedy"}') \
    || fail "POST /generate"
  case $text in *Paris*) ;; *) fail "no Paris in the answer: $text" ;; esac
  say "answer: $text"
}

# SIGTERM (podman stop) while a stream runs: the stream ends whole ([DONE] after every token),
# then gunicorn exits 0.
stop_during_request() {
  local body started code deadline
  body='{"prompt":"Tell me a story.","chat":true,"strategy":"greedy","max_new_tokens":40,"ignore_eos":true,"stream":true}'
  curl -sN -o "$logs/stream.txt" -X POST "$base_url/generate" \
    -H 'Content-Type: application/json' -d "$body" &
  local client=$!
  # The signal goes once generation has begun: 40 tokens take about a second uncompiled,
  # the signal 0.1-0.2 s (and, on a busy machine, 40 tokens must take under a minute).
  deadline=$(($(date +%s) + 60))
  until grep -q '"text"' "$logs/stream.txt" 2>/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "the stream sent nothing"
    sleep 0.05
  done
  started=$(now)
  pm stop -t 60 "$name" >/dev/null || fail "podman stop"
  stop_s=$(since "$started")
  wait "$client" || fail "the stream running at SIGTERM broke off"
  python3 - "$logs/stream.txt" <<'PY' || fail "the stream running at SIGTERM was cut short"
import json, sys
events = [line[6:].strip() for line in open(sys.argv[1]) if line.startswith("data: ")]
assert events[-1] == "[DONE]", events[-3:]
ends = [json.loads(e) for e in events[:-1] if "finish_reason" in json.loads(e)]
assert [(e["finish_reason"], e["completion_tokens"]) for e in ends] == [("length", 40)], ends
PY
  # ... and it ended after the signal, not before it.
  podman logs "$name" 2>&1 | python3 -c '
import sys
lines = sys.stdin.read().splitlines()
term = min(i for i, line in enumerate(lines) if "Handling signal: term" in line)
served = max(i for i, line in enumerate(lines) if "POST /generate 200" in line)
assert term < served, "the stream had ended before SIGTERM"' || fail "no request was running at SIGTERM"
  code=$(podman inspect -f '{{.State.ExitCode}}' "$name")
  [ "$code" = 0 ] || fail "exit code $code after SIGTERM (137: killed at the stop timeout)"
}

install_tools
podman info >/dev/null 2>"$logs/info.log" || { cat "$logs/info.log" >&2; fail "podman info"; }
# What an interrupted run may have left.
remove_test_containers

started=$(now)
"$here/base.sh" >&2 || fail "the base image"
base_s=$(since "$started")

say "building $image"
started=$(now)
"$here/build.sh" "$image" >"$logs/build.log" 2>&1 || { tail -n 40 "$logs/build.log" >&2; fail "the build"; }
build_s=$(since "$started")

[ "$(podman image inspect -f '{{.Config.User}}' "$image")" = textgen ] || fail "the image runs as root"
podman image inspect -f '{{json .HealthCheck.Test}}' "$image" | grep -q readyz || fail "no HEALTHCHECK"

say "cold start (fresh volume)"
start_server
cold_s=$ready_s
check_answers
[ "$(podman exec "$name" id -u)" = 10001 ] || fail "the server runs as root"
pm healthcheck run "$name" >/dev/null || fail "podman healthcheck run"
health=$(podman inspect -f '{{.State.Health.Status}}' "$name")
[ "$health" = healthy ] || fail "health status $health"
memory=$(curl -sf "$base_url/info" | python3 -c 'import json, sys; m = json.load(sys.stdin)["memory"]
print(m["rss_mib"], m["peak_rss_mib"])')
read -r rss_mib peak_rss_mib <<<"$memory"
container_memory=$(podman stats --no-stream --format '{{.MemUsage}}' "$name" | cut -d/ -f1)
stop_during_request
cold_stop_s=$stop_s
podman rm "$name" >/dev/null

say "warm start (the same volume)"
start_server
warm_s=$ready_s
check_answers
pm stop -t 60 "$name" >/dev/null || fail "podman stop"
code=$(podman inspect -f '{{.State.ExitCode}}' "$name")
[ "$code" = 0 ] || fail "exit code $code after SIGTERM"

total_s=$(since "$script_start")
say "passed"
python3 -c 'import json, sys
keys = ["base_s", "build_s", "cold_start_s", "warm_start_s", "stop_during_request_s", "total_s"]
report = {key: float(value) for key, value in zip(keys, sys.argv[1:7])}
report.update(worker_rss_mib=float(sys.argv[7]), worker_peak_rss_mib=float(sys.argv[8]),
              container_memory=sys.argv[9].strip())
print(json.dumps(report))' "$base_s" "$build_s" "$cold_s" "$warm_s" "$cold_stop_s" "$total_s" \
  "$rss_mib" "$peak_rss_mib" "$container_memory"
