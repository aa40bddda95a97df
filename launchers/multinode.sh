#!/usr/bin/env bash
# Multi-node without SLURM: check a DeepSpeed hostfile, then run DeepSpeed's pdsh/ssh launcher on it.
#
#   launchers/multinode.sh hostfile launchers/distill_gpt.py --deepspeed_config ds_configs/zero3.json \
#       --output_dir /shared/out/run1 --save_steps 500
#   FCD_DS_DRY_RUN=1 launchers/multinode.sh hostfile launchers/distill_gpt.py ...   # print the command only
#   DEEPSPEED_ARGS="--include node1:0,1@node2 --no_ssh_check" launchers/multinode.sh ...  # more runner flags
#
# hostfile: one line per host, "<host> slots=<ranks>" ('#' comments allowed), the first host is the
# master (MASTER_ADDR). Runs, from the first host, with passwordless ssh to every host and the same paths
# everywhere:
#   deepspeed --hostfile <hostfile> --master_addr <first host> [--master_port $MASTER_PORT] $DEEPSPEED_ARGS \
#       <launcher> <flags> --auto_resume
# --auto_resume: rerunning the same command after a failure continues from the latest checkpoint.
# Why a wrapper: DeepSpeed 0.19.8's runner answers a hostfile that names no host with a Python traceback,
# and a hostfile path that does not exist with a warning and a run on the local machine alone.
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

[[ $# -ge 2 ]] || die "usage: launchers/multinode.sh HOSTFILE LAUNCHER [FLAGS...]; e.g. launchers/multinode.sh hostfile launchers/distill_gpt.py --output_dir out/run1"
hostfile=$1
launcher=$2
shift 2
[[ -f $hostfile ]] || die "hostfile: $hostfile does not exist; write one line per host, '<host> slots=<GPUs>'"
[[ -f $launcher ]] || die "launcher: $launcher does not exist; pass a script such as launchers/distill_gpt.py"

hosts=()
slots=0
lineno=0
while IFS= read -r line || [[ -n $line ]]; do
    lineno=$((lineno + 1))
    line=${line%%#*}
    [[ -z ${line//[[:space:]]/} ]] && continue
    if [[ $line =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([1-9][0-9]*)[[:space:]]*$ ]]; then
        hosts+=("${BASH_REMATCH[1]}")
        slots=$((slots + BASH_REMATCH[2]))
    else
        die "hostfile: line $lineno of $hostfile is not '<host> slots=<GPUs>': '$line'"
    fi
done <"$hostfile"
[[ ${#hosts[@]} -gt 0 ]] || die "hostfile: $hostfile names no host; write one line per host, '<host> slots=<GPUs>'"
for flag in "$@"; do
    case $flag in
        --resume | --overwrite_output_dir)
            die "$flag: launchers/multinode.sh passes --auto_resume (continue when output_dir holds a checkpoint of this run); drop $flag" ;;
    esac
done

cmd=(deepspeed --hostfile "$hostfile" --master_addr "${hosts[0]}")
[[ -n ${MASTER_PORT:-} ]] && cmd+=(--master_port "$MASTER_PORT")
read -r -a extra <<<"${DEEPSPEED_ARGS:-}"
cmd+=("${extra[@]}")
cmd+=("$launcher" "$@" --auto_resume)
if [[ ${FCD_DS_DRY_RUN:-0} == 1 ]]; then
    echo "hosts: ${hosts[*]} (${#hosts[@]} nodes, $slots ranks)"
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
command -v deepspeed >/dev/null || die "deepspeed: not on PATH; activate the environment where fcd_ds is installed"
exec "${cmd[@]}"
