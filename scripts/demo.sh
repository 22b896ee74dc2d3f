#!/usr/bin/env bash
# The main job on one machine: start a collector on 127.0.0.1 with SQLite under ./var,
# register a probe, run one full measurement session against it (ping train, download,
# upload), show the session summary and the Allegato 2 compliance report, stop the collector.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
VAR=${VAR:-var/demo}
DB=$VAR/collector.sqlite3
mkdir -p "$VAR"
rm -f "$VAR/collector.addr"

"$BIN/bbprobe-collector" --db "$DB" serve --host 127.0.0.1 --port 0 \
  --addr-file "$VAR/collector.addr" 2>"$VAR/collector.log" &
collector_pid=$!
trap 'kill "$collector_pid" 2>/dev/null; wait "$collector_pid" 2>/dev/null || true' EXIT

for _ in $(seq 1 100); do
  [ -s "$VAR/collector.addr" ] && break
  if ! kill -0 "$collector_pid" 2>/dev/null; then
    echo "demo: the collector did not start:" >&2; cat "$VAR/collector.log" >&2; exit 1
  fi
  sleep 0.1
done
url=$(cat "$VAR/collector.addr")
echo "== collector listening on $url (database $DB)"

# One demo line across runs, so repeated demos add up to one line's data: its token is
# kept beside the database (0600), as a probe keeps its token_file.
probe=demo-probe
token_file=$VAR/$probe.token
if [ -s "$token_file" ] && "$BIN/bbprobe-collector" --db "$DB" probe list | grep -q "^$probe "; then
  token=$(cat "$token_file")
else
  if "$BIN/bbprobe-collector" --db "$DB" probe list | grep -q "^$probe "; then
    probe="demo-probe-$(date -u +%Y%m%d%H%M%S)"  # registered, but its token is lost
    token_file=$VAR/$probe.token
  fi
  token=$("$BIN/bbprobe-collector" --db "$DB" probe add "$probe" --operator "BT Italia" \
    --offer "demo line" --technology FTTH --download-nominal-kbps 100000 \
    --download-min-kbps 2200 --upload-nominal-kbps 20000 --upload-min-kbps 150 \
    --max-delay-ms 30 --max-loss-ratio 0.004)
  (umask 077 && printf '%s\n' "$token" > "$token_file")
fi

echo "== measurement session of probe $probe (about 35 s)"
status=0
# The token in the environment, not on the command line (ps shows argv to every user).
BBPROBE_TOKEN="$token" "$BIN/bbprobe" --config configs/agent.demo.toml --collector "$url" \
  --set "state_dir=$VAR/agent-state" run || status=$?
if [ "$status" -ne 0 ]; then
  echo "demo: the session ended with exit code $status (see above)" >&2
fi

echo
echo "== compliance report (Allegato 2) for $probe"
"$BIN/bbprobe-collector" --db "$DB" report --probe "$probe"
"$BIN/bbprobe-collector" --db "$DB" report --probe "$probe" --format html \
  -o "$VAR/report.html" 2>/dev/null
echo "(the same report with plots: $VAR/report.html)"
exit "$status"
