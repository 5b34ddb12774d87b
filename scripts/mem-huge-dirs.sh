#!/bin/bash
# Peak RSS (VmHWM) of `backtree mount` over huge directories (docs/mount.md, "Memory").
# usage: scripts/mem-huge-dirs.sh BACKTREE REPO MOUNTPOINT N GENS
#   REPO from: scale_sim --repo REPO --chunks 10000000 --hosts 1 --gens 5
#              backtree maintain index --repo REPO
# Prints VmHWM after: an `ls` of host0/latest/d0000 (separate mount), 1 and 50 random `stat`s
# there, N random `cat`s there (timed), then N random `cat`s in every dNNNN of the first GENS
# generations.
BIN=$1; REPO=$2; MNT=$3; N=$4; GENS=${5:-1}
mkdir -p $MNT
$BIN mount --repo $REPO $MNT > /dev/null 2>&1 &
PID=$!
for i in $(seq 50); do mountpoint -q $MNT && break; sleep 0.2; done
hwm() { grep VmHWM /proc/$PID/status | awk '{print $2/1024 " MB"}'; }
G=$(ls $MNT/host0 | grep -v latest | head -$GENS)
NF=$(ls $MNT/host0/latest/d0000 2>/dev/null | wc -l)
echo "files per dir: $NF  hwm after ls: $(hwm)"
fusermount -u $MNT 2>/dev/null; sleep 0.5; kill $PID 2>/dev/null; wait $PID 2>/dev/null
$BIN mount --repo $REPO $MNT > /dev/null 2>&1 &
PID=$!
for i in $(seq 50); do mountpoint -q $MNT && break; sleep 0.2; done
LG=$(readlink $MNT/host0/latest)
stat $MNT/host0/latest/d0000/f00000 >/dev/null; echo "1 stat: $(hwm)"
RANDOM=42
for i in $(seq 50); do printf -v f "f%05d" $(((RANDOM*32768+RANDOM) % NF)); stat $MNT/host0/$LG/d0000/$f > /dev/null; done; echo "50 stats: $(hwm)"
t0=$(date +%s.%N)
for i in $(seq $N); do printf -v f "f%05d" $(((RANDOM*32768+RANDOM) % NF)); cat $MNT/host0/$LG/d0000/$f > /dev/null; done
t1=$(date +%s.%N); echo "$N cats d0000: $(hwm) in $(echo "$t1 - $t0" | bc) s"
if [ "$GENS" -gt 1 ]; then
 for g in $G; do dd=$(ls $MNT/host0/$g | grep '^d' ); for d in $dd; do
 for i in $(seq $N); do printf -v f "f%05d" $(((RANDOM*32768+RANDOM) % NF)); cat $MNT/host0/$g/$d/$f > /dev/null 2>&1; done; done; done
 echo "$N cats per gen dir in $GENS gens: $(hwm)"
fi
grep -E 'VmHWM|VmRSS|RssAnon|RssFile|Threads' /proc/$PID/status
fusermount -u $MNT; sleep 0.5; kill $PID 2>/dev/null; wait $PID 2>/dev/null
