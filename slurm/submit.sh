#!/usr/bin/env bash
# Submit spineps on a SLURM cluster: one participant array (one subject per task, all into
# OUT_DIR), then the group job, which waits for the array (--dependency=afterok:<ids>).
#
# usage: slurm/submit.sh BIDS_DIR OUT_DIR [options] [-- app options for every participant task]
#   how the tasks run spineps (one of; default: $SPINEPS_SIF, else $SPINEPS_CMD, else "spineps"):
#   --sif FILE            an Apptainer/Singularity image
#   --venv DIR            a Python environment with spineps installed (runs DIR/bin/spineps)
#   --cmd "CMD"           a command line, split on whitespace, e.g. "python3 /opt/spineps/run.py"
#   --subjects FILE       subject labels, one per line (default: every sub-* folder of BIDS_DIR)
#   --max-parallel N      at most N tasks of an array at once (sbatch --array=...%N)
#   --max-array-size N    tasks per array (default 1000, SLURM's usual MaxArraySize is 1001);
#                         longer lists become several arrays, and the group job waits for all
#   --dependency TYPE     afterok (default: the group job runs only when every task succeeded;
#                         otherwise SLURM cancels it) or afterany (= --allow-partial)
#   --allow-partial       run the group job even if some tasks failed; it lists the subjects
#                         without a finished task in its log and in subjects_<time>_missing.txt
#   --sbatch-args "..."   extra sbatch options for the array, e.g. "--partition gpu --gres gpu:1"
#   --group-sbatch-args   extra sbatch options for the group job
#   --no-group            submit only the participant array(s)
# Example:
#   slurm/submit.sh /data/bids /data/derivatives/spineps --sif spineps.sif --max-parallel 100 \
#       --sbatch-args "--gres gpu:1" -- --skip-bids-validation
# Rerunning the same command finishes only what is missing (complete scans are skipped).
# Writes the subject list, the app options and the SLURM logs into OUT_DIR/logs/slurm/;
# prints the job ids.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "submit.sh: $*" >&2; exit "${2:-64}"; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]] && { usage; exit 0; }
[[ $# -ge 2 ]] || { usage >&2; exit 64; }
bids_dir="$(realpath -m -- "$1")"
out_dir="$(realpath -m -- "$2")"
shift 2

sif="${SPINEPS_SIF:-}"
cmd="${SPINEPS_CMD:-}"
runner_opts=0
subjects_in=""
max_parallel=""
max_array="${MAX_ARRAY_SIZE:-1000}"
dependency="afterok"
sbatch_args=""
group_sbatch_args=""
group=1
app_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --sif) sif="$(realpath -m -- "${2:?--sif needs a file}")"; cmd=""; runner_opts=$((runner_opts + 1)); shift 2 ;;
        --venv) cmd="$(realpath -m -- "${2:?--venv needs a folder}")/bin/spineps"; sif=""
                runner_opts=$((runner_opts + 1)); shift 2 ;;
        --cmd) cmd="${2:?--cmd needs a command}"; sif=""; runner_opts=$((runner_opts + 1)); shift 2 ;;
        --subjects) subjects_in="${2:?--subjects needs a file}"; shift 2 ;;
        --max-parallel) max_parallel="${2:?}"; shift 2 ;;
        --max-array-size) max_array="${2:?}"; shift 2 ;;
        --dependency) dependency="${2:?}"; shift 2 ;;
        --allow-partial) dependency="afterany"; shift ;;
        --sbatch-args) sbatch_args="${2:-}"; shift 2 ;;
        --group-sbatch-args) group_sbatch_args="${2:-}"; shift 2 ;;
        --no-group) group=0; shift ;;
        --) shift; app_args=("$@"); break ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
(( runner_opts <= 1 )) || die "give only one of --sif, --venv, --cmd"
case "$dependency" in afterany|afterok) ;; *) die "--dependency must be afterany or afterok" ;; esac
[[ "$max_array" =~ ^[1-9][0-9]*$ ]] || die "--max-array-size must be a positive integer"
[[ -z "$max_parallel" || "$max_parallel" =~ ^[1-9][0-9]*$ ]] || die "--max-parallel must be a positive integer"
[[ -d "$bids_dir" ]] || die "BIDS_DIR $bids_dir does not exist" 66
[[ -z "$sif" || -f "$sif" ]] || die "image $sif does not exist" 66
if [[ -z "$sif" ]]; then
    [[ -n "$cmd" ]] || cmd="spineps"
    read -r -a words <<< "$cmd"
    if [[ -x "$cmd" ]]; then
        :  # one executable path (may contain spaces)
    elif [[ "$cmd" == */bin/spineps && ! -e "$cmd" ]]; then
        die "no spineps in that environment: $cmd does not exist" 69
    elif [[ ${#words[@]} -eq 0 ]] || ! command -v "${words[0]}" >/dev/null; then
        echo "submit.sh: warning: '${words[0]:-}' is not found here; the compute nodes must have it" >&2
    fi
fi
command -v sbatch >/dev/null || die "sbatch not found (not on a SLURM login node?)" 69

logs="$out_dir/logs/slurm"
mkdir -p "$logs"
stamp="$(date -u +%Y%m%dT%H%M%SZ)_$$"
list="$logs/subjects_${stamp}.txt"
if [[ -n "$subjects_in" ]]; then
    grep -v -e '^[[:space:]]*$' -e '^#' "$subjects_in" | sed 's/^[[:space:]]*sub-//; s/^[[:space:]]*//; s/[[:space:]]*$//' > "$list.tmp"
else
    find "$bids_dir" -mindepth 1 -maxdepth 1 -type d -name 'sub-*' -printf '%f\n' | sed 's/^sub-//' | LC_ALL=C sort > "$list.tmp"
fi
mv "$list.tmp" "$list"
n="$(wc -l < "$list")"
(( n > 0 )) || die "no subjects to process (BIDS_DIR has no sub-* folder, or the list is empty)" 66

# the app options, NUL-separated: every argument reaches spineps as it was given here
# (spaces, quotes and glob characters included)
args_file="$logs/app_args_${stamp}.nul"
if (( ${#app_args[@]} )); then printf '%s\0' "${app_args[@]}" > "$args_file.tmp"; else : > "$args_file.tmp"; fi
mv "$args_file.tmp" "$args_file"

# the tasks read these from the environment (sbatch --export=ALL)
export SUBJECTS_FILE="$list" BIDS_DIR="$bids_dir" OUT_DIR="$out_dir" SPINEPS_SIF="$sif" SPINEPS_CMD="$cmd"
export SPINEPS_ARGS_FILE="$args_file"
unset SPINEPS_ARGS
if [[ "$dependency" == afterany ]]; then export SPINEPS_ALLOW_PARTIAL=1; else export SPINEPS_ALLOW_PARTIAL=0; fi

read -r -a extra <<< "$sbatch_args"  # option strings: split on whitespace, never glob-expanded
ids=()
offset=0
while (( offset < n )); do
    size=$(( n - offset < max_array ? n - offset : max_array ))
    spec="1-${size}${max_parallel:+%$max_parallel}"
    export ARRAY_OFFSET="$offset"
    out="$(sbatch --parsable --export=ALL --array="$spec" --output="$logs/spineps_%A_%a.out" \
           "${extra[@]}" "$here/spineps_array.sbatch")"
    id="${out%%;*}"
    [[ "$id" =~ ^[0-9]+$ ]] || die "sbatch did not return a job id: $out" 75
    ids+=("$id")
    echo "participant array $id: subjects $((offset + 1))-$((offset + size)) of $n ($spec)"
    offset=$(( offset + size ))
done

if (( group )); then
    deps="$(IFS=:; echo "${ids[*]}")"
    read -r -a gextra <<< "$group_sbatch_args"
    out="$(sbatch --parsable --export=ALL --dependency="$dependency:$deps" --kill-on-invalid-dep=yes \
           --output="$logs/spineps_group_%j.out" "${gextra[@]}" "$here/spineps_group.sbatch")"
    echo "group job ${out%%;*}: after $dependency:$deps"
fi
echo "subject list: $list"
