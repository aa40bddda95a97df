#!/usr/bin/env bash
# Multi-node without SLURM: check a DeepSpeed hostfile, then run DeepSpeed's pdsh/ssh launcher on it.
#
#   launchers/multinode.sh hostfile launchers/distill_gpt.py --deepspeed_config ds_configs/zero3.json \
#       --output_dir /shared/out/run1 --save_steps 500
#   launchers/multinode.sh hostfile --module fcd_ds.launchers.distill_gpt ...        # an installed fcd_ds
#   FCD_DS_DRY_RUN=1 launchers/multinode.sh hostfile launchers/distill_gpt.py ...   # print the command only
#   DEEPSPEED_ARGS="--include node1:0,1@node2 --no_ssh_check" launchers/multinode.sh ...  # more runner flags
#
# hostfile: one line per host, "<host> slots=<ranks>" ('#' comments allowed), the first host is the
# master (MASTER_ADDR). Runs, from the first host, with passwordless ssh to every host and the same paths
# everywhere:
#   deepspeed --hostfile <hostfile> --master_addr <first host> [--master_port $MASTER_PORT] $DEEPSPEED_ARGS \
#       <launcher> <flags> --auto_resume
# --auto_resume: rerunning the same command after a failure continues from the latest checkpoint.
# Flags are quoted for the remote hosts' shells (see remote_word below).
# Why a wrapper: DeepSpeed 0.19.8's runner answers a hostfile that names no host with a Python traceback,
# and a hostfile path that does not exist with a warning and a run on the local machine alone.
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

[[ $# -ge 2 ]] || die "usage: launchers/multinode.sh HOSTFILE LAUNCHER|--module NAME [FLAGS...]; e.g. launchers/multinode.sh hostfile launchers/distill_gpt.py --output_dir out/run1"
hostfile=$1
launcher=$2
shift 2
module=()
if [[ $launcher == --module ]]; then  # an installed fcd_ds: --module fcd_ds.launchers.distill_gpt (DeepSpeed's --module)
    [[ $# -ge 1 && $1 =~ ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$ ]] ||
        die "--module: give a module name, e.g. --module fcd_ds.launchers.distill_gpt"
    module=(--module)
    launcher=$1
    shift
fi
[[ -f $hostfile ]] || die "hostfile: $hostfile does not exist; write one line per host, '<host> slots=<GPUs>'"
[[ ${#module[@]} -gt 0 || -f $launcher ]] || die "launcher: $launcher does not exist; pass a script such as launchers/distill_gpt.py, or --module fcd_ds.launchers.distill_gpt"

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

read -r -a extra <<<"${DEEPSPEED_ARGS:-}"
for word in "${extra[@]}"; do
    case $word in
        --launcher=* | --launcher) [[ " ${extra[*]} " =~ \ --launcher[=\ ]pdsh\  ]] ||
            die "DEEPSPEED_ARGS: launchers/multinode.sh quotes flags for DeepSpeed's pdsh launcher only; for another --launcher call deepspeed directly" ;;
    esac
done

# The remote shell: with more than one host DeepSpeed's pdsh runner joins the launcher's flags into one
# command line that each host's shell reads again, and quotes only flags that hold a space (as "...",
# escaping only '"'; deepspeed/launcher/multinode_runner.py PDSHRunner.parse_user_args, 0.19.8). So every
# flag is quoted here for that shell: single quotes when it holds no space, and inside DeepSpeed's double
# quotes \, $ and ` escaped when it does. $(...), backticks and spaces then reach the launcher unchanged.
# --force_multi keeps DeepSpeed on the pdsh path (where the quoting belongs) even if --include picks one host.
remote_word() {
    local w=$1
    if [[ $w == *" "* ]]; then
        w=${w//\\/\\\\}; w=${w//\$/\\\$}; w=${w//\`/\\\`}; printf '%s' "$w"
    elif [[ $w =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then
        printf '%s' "$w"
    else
        printf "'%s'" "${w//\'/\'\\\'\'}"
    fi
}
[[ $launcher =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]] || die "launcher: '$launcher' holds characters a remote shell would read; use a path of letters, digits and ./_-"
flags=("$@" --auto_resume)
if [[ ${#hosts[@]} -gt 1 ]]; then
    quoted=()
    for flag in "${flags[@]}"; do quoted+=("$(remote_word "$flag")"); done
    flags=("${quoted[@]}")
    extra+=(--force_multi)
fi

cmd=(deepspeed --hostfile "$hostfile" --master_addr "${hosts[0]}")
[[ -n ${MASTER_PORT:-} ]] && cmd+=(--master_port "$MASTER_PORT")
cmd+=("${extra[@]}" "${module[@]}")
cmd+=("$launcher" "${flags[@]}")
if [[ ${FCD_DS_DRY_RUN:-0} == 1 ]]; then
    echo "hosts: ${hosts[*]} (${#hosts[@]} nodes, $slots ranks)"
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
command -v deepspeed >/dev/null || die "deepspeed: not on PATH; activate the environment where fcd_ds is installed"
exec "${cmd[@]}"
