#!/usr/bin/env bash
# Sets up a fresh machine for vidcap: system packages the tests use, and .venv with vidcap installed.
# Idempotent; safe to run again. apt-get runs only when something is missing and we are root.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v ffmpeg >/dev/null || need+=(ffmpeg)
[[ -x /usr/sbin/sshd ]] || need+=(openssh-server)
command -v ssh >/dev/null || need+=(openssh-client)
command -v rsync >/dev/null || need+=(rsync)
command -v crontab >/dev/null || need+=(cron)
# Real single-node Slurm for the job tests (tests/slurm.py starts it): controller, node daemon, client
# commands (sbatch, squeue, sacct, scancel, sinfo), munge for authentication, and slurmdbd with MariaDB so
# that sacct reports finished jobs.
have() { command -v "$1" >/dev/null || [[ -x /usr/sbin/$1 ]]; }
have slurmctld || need+=(slurmctld)
have slurmd || need+=(slurmd)
have sbatch || need+=(slurm-client)
have munged || need+=(munge)
have slurmdbd || need+=(slurmdbd)
have mariadbd && have mariadb-install-db || need+=(mariadb-server)
if ((${#need[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    else
        echo "setup: please install: ${need[*]} (e.g. sudo apt-get install ${need[*]})" >&2
        exit 1
    fi
fi

PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
log=$(mktemp)
if ! .venv/bin/python -m pip install -q -e '.[test]' >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup: pip install failed" >&2
    exit 1
fi
rm -f "$log"
.venv/bin/vidcap --version
