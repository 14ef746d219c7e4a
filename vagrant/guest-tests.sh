#!/usr/bin/env bash
# Inside a Vagrant VM: run the tiers in TETHER_TIERS (default "bpf netns"; an
# entry may also name one file below tests/, e.g. netns/test_drain.py) and
# print, per tier, only what a reader needs - the failures, errors and skip
# reasons, the short summary and the duration.  Vagrant shows a provisioner's
# output line by line, which turns pytest's progress dots into noise; the
# whole output of each tier is kept in /var/log/tether-<tier>.log.  Exit
# status: 1 if any tier failed.
set -uo pipefail
cd "$(dirname "$0")/.."
venv=$(vagrant/guest-venv.sh)
echo "== tether on $(uname -r) ($(. /etc/os-release && echo "$PRETTY_NAME")), $(nproc) CPUs, venv $venv"
rc=0
for tier in ${TETHER_TIERS:-bpf netns}; do
  logf=/var/log/tether-${tier//\//-}.log
  t0=$SECONDS
  echo "== $tier tier: running (log: $logf)"
  "$venv/bin/python" -m pytest -q -rfEs -p no:cacheprovider --tb=short "tests/$tier" >"$logf" 2>&1
  r=$?
  # from the first section header (FAILURES/ERRORS/short test summary) to the end
  report=$(awk '/^=+ (FAILURES|ERRORS|short test summary info) =+$/ {p=1} p' "$logf")
  if [ -n "$report" ]; then tail -n 400 <<<"$report"; else tail -n 1 "$logf"; fi
  echo "== $tier tier: exit $r in $((SECONDS - t0)) s"
  [ $r -eq 0 ] || rc=1
done
exit $rc
