#!/bin/bash
# A/B: workload b, ours only, before (2adbf33~1) and after (HEAD) the sticky centres, alternated.
R=/tmp/bs4/ab; mkdir -p $R; cd /tmp
for i in 1 2; do
  for v in old new; do
    # /tmp/ab_old, /tmp/ab_new: git worktrees of 2adbf33~1 and 8dc4fb7, each with a symlink
    # idefender_gpu/kernels -> ../kernels (so the editable install's kernels are not used)
    export PYTHONPATH=/tmp/ab_$v
    echo "== $v$i $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    /work/main/.venv/bin/python -c "import sys; from idefender_gpu.cli import main; sys.exit(main(sys.argv[1:]))" bench --workload b --threads 2 --references '' --out $R/$v$i > $R/$v$i.log 2>&1
    grep -h "s/iteration; fit to tol" $R/$v$i.log
  done
done
unset PYTHONPATH
echo ABDONE $(date +%T)
