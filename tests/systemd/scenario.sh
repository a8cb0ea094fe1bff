#!/bin/bash
# Runs inside the booted container (as dcmfs-scenario.service) and records
# one line per check in /results/results.txt: "ok NAME" or "not ok NAME: why".
# Driven by scripts/systemd-test; tests/test_systemd.py reads the results.
set -u
R=/results/results.txt
: > "$R"
D="python3 -m dcmfs.cli"
ok() { echo "ok $1" >> "$R"; }
no() { echo "not ok $1: $2" >> "$R"; }
check() { local name=$1; shift; if "$@" >> /results/scenario.log 2>&1; then ok "$name"; else no "$name" "command failed: $*"; fi; }
mounted() { [ "$(findmnt -n -o FSTYPE --mountpoint "$1" 2>/dev/null)" = fuse.dcmfs ]; }
exec >> /results/scenario.log 2>&1
set -x
export FUSE_LIBRARY_NAME=fuse3

# --- at boot (before this unit): dcmfs@boot, then the PACS stand-in bound to it ----
systemctl is-active -q dcmfs@boot.service && ok boot-active || no boot-active "$(systemctl is-active dcmfs@boot)"
[ "$(cat /run/pacs-boot-saw 2>&1)" = fuse.dcmfs ] && ok boot-pacs-after-mount \
    || no boot-pacs-after-mount "the PACS saw '$(cat /run/pacs-boot-saw 2>&1)' at boot"
journalctl -b -o cat --no-pager _PID=1 | grep -E '(Start|Stopp)(ing|ed) (pacs-boot|dcmfs@boot)' > /results/boot-order.txt
python3 - <<'PY' && ok boot-order || no boot-order "$(tr '\n' '|' < /results/boot-order.txt)"
lines = open("/results/boot-order.txt").read().splitlines()
first = lambda p: next(i for i, l in enumerate(lines) if l.startswith(p))
assert first("Started dcmfs@boot") < first("Started pacs-boot"), lines
PY
check boot-stop systemctl stop pacs-boot.service dcmfs@boot.service
mounted /srv/boot/mnt && no boot-unmounted "still mounted" || ok boot-unmounted

# --- install: units, helper, example ------------------------------------------
check install $D install-systemd
check unit-verify systemd-analyze verify dcmfs@test.service

# instance "test": key as a systemd credential, metrics on loopback
mkdir -p /srv/dcmfs /srv/pacs /etc/dcmfs
head -c 32 /dev/urandom > /etc/dcmfs/test.key; chmod 600 /etc/dcmfs/test.key
cat > /etc/dcmfs/test.toml <<'TOML'
store = "/srv/dcmfs/test"
mountpoint = "/srv/pacs"
metrics = "127.0.0.1:9641"
[options]
allow_other = true
[key]
credential = "dcmfs.key"
TOML
check init $D init /srv/dcmfs/test --key-file /etc/dcmfs/test.key
# the test records how each stop ended (the unit is gone from 'systemctl show' after it)
mkdir -p /etc/systemd/system/dcmfs@.service.d
cat > /etc/systemd/system/dcmfs@.service.d/test.conf <<'UNIT'
[Service]
ExecStopPost=/bin/sh -c 'echo "$SERVICE_RESULT $EXIT_CODE $EXIT_STATUS" >> /run/dcmfs-stop-%i'
RestartSec=1
UNIT
systemctl daemon-reload

# --- start returns only once the mount is live ----------------------------------
t0=$(date +%s.%N)
if systemctl start dcmfs@test; then ok start; else no start "systemctl start failed"; fi
t1=$(date +%s.%N)
echo "start took $(echo "$t1 - $t0" | bc 2>/dev/null || echo "?") s"
if mounted /srv/pacs; then ok live-after-start; else no live-after-start "no fuse.dcmfs at /srv/pacs right after start"; fi
echo "study one" > /srv/pacs/one.dcm && mkdir /srv/pacs/dir && head -c 3000000 /dev/urandom > /srv/pacs/dir/big
sha_big=$(sha256sum /srv/pacs/dir/big | cut -d' ' -f1)
[ "$(cat /srv/pacs/one.dcm)" = "study one" ] && ok write-read || no write-read "read back differs"

PID=$(systemctl show -p MainPID --value dcmfs@test)
echo "MainPID $PID"; cat /proc/$PID/status | grep -E 'Cap|NoNewPrivs|Seccomp'
[ "$(readlink /proc/$PID/ns/mnt)" = "$(readlink /proc/1/ns/mnt)" ] && ok same-mount-namespace \
    || no same-mount-namespace "the daemon has a private mount namespace"
# CAP_SYS_ADMIN, and CAP_SETUID/CAP_SETGID for the parser workers to become nobody
grep -q '^CapBnd:\s*00000000002000c0$' /proc/$PID/status && ok cap-bounding-set \
    || no cap-bounding-set "$(grep CapBnd /proc/$PID/status)"
grep -q '^NoNewPrivs:\s*0$' /proc/$PID/status && ok no-new-privs-off || no no-new-privs-off "NoNewPrivs set"
# nspawn filters the container too; the unit adds its own filter on top
own=$(awk '/^Seccomp_filters:/{print $2}' /proc/$PID/status); base=$(awk '/^Seccomp_filters:/{print $2}' /proc/1/status)
[ "${own:-0}" -gt "${base:-0}" ] && ok seccomp-filter || no seccomp-filter "filters: daemon ${own:-?} vs PID 1 ${base:-?}"
[ "$(cat /proc/$PID/personality 2>/dev/null || echo 00000000)" = 00000000 ] && ok personality || no personality "?"
# a DICOM file is analysed and coded by a parser worker confined under the unit
python3 - <<'PY' && sleep 0.5 && $D recompress /srv/dcmfs/test > /dev/null
import io
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
meta = FileMetaDataset()
meta.MediaStorageSOPClassUID = CTImageStorage
meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
meta.TransferSyntaxUID = ExplicitVRLittleEndian
ds = Dataset()
ds.file_meta = meta
ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, "1.2.3.4.5", "CT"
ds.Rows = ds.Columns = 64
ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
ds.PixelData = (np.add.outer(np.arange(64), np.arange(64)) * 16).astype("<u2").tobytes()
ds.save_as("/srv/pacs/ct.dcm", enforce_file_format=True)
PY
worker=$(python3 -c 'import os
for p in filter(str.isdigit, os.listdir("/proc")):
    try:
        if b"dcmfs.sandbox.worker" in open(f"/proc/{p}/cmdline", "rb").read():
            print(p); break
    except OSError:
        pass')
[ -n "$worker" ] && [ "$(stat -c %u /proc/$worker)" = 65534 ] && ok parser-worker-nobody \
    || no parser-worker-nobody "worker ${worker:-none} uid $(stat -c %u /proc/${worker:-0} 2>/dev/null)"
# the re-encoder's workers give way to the PACS (nice 10) under the unit's syscall filter too
nice=$(awk '{print $19}' /proc/${worker:-0}/stat 2>/dev/null)
[ "$nice" = 10 ] && ok parser-worker-nice || no parser-worker-nice "worker ${worker:-none} nice ${nice:-?}"
$D stats /srv/dcmfs/test --json > /results/stats.json 2>&1
python3 -c '
import json
groups = json.load(open("/results/stats.json"))["groups"]
ct = [g for g in groups if g["modality"] == "CT"]
assert ct and ct[0]["paths"] == {"frames": 1}, groups
' && ok parser-worker-codes || no parser-worker-codes "$(head -c 300 /results/stats.json)"
journalctl -u dcmfs@test -o cat --no-pager | grep -q "parser workers run without" \
    && no parser-worker-confined "$(journalctl -u dcmfs@test -o cat | grep 'parser workers')" \
    || ok parser-worker-confined
st=$(systemctl show -p StatusText --value dcmfs@test); echo "status: $st"
case "$st" in *files*ratio*backlog*) ok status-text;; *) no status-text "StatusText=$st";; esac
# the journal: priorities from the <N> prefixes, no second timestamp
journalctl -u dcmfs@test -o cat --no-pager | tee /results/journal-test.txt
journalctl -u dcmfs@test -o json --no-pager | python3 -c '
import json, sys
recs = [json.loads(l) for l in sys.stdin]
mine = [r for r in recs if "mounted store" in str(r.get("MESSAGE"))]
assert mine and mine[0]["PRIORITY"] == "6", mine
assert not mine[0]["MESSAGE"][:4].isdigit(), mine[0]["MESSAGE"]
assert not any("one.dcm" in str(r.get("MESSAGE")) for r in recs)
' && ok journal-priority || no journal-priority "no PRIORITY=6 line without a timestamp"
$D status --json > /results/status.json && python3 - <<'PY' && ok dcmfs-status || no dcmfs-status "status --json lacks fields"
import json
r = json.load(open("/results/status.json"))
r = r[0] if isinstance(r, list) else r
for k in ("store", "pid", "uptime_seconds", "rss_bytes", "cpu_seconds", "ops", "read_bytes",
          "written_bytes", "ratio", "backlog_files"):
    assert k in r, k
assert r["written_bytes"] >= 3000000, r
PY
python3 -c '
import urllib.request
t = urllib.request.urlopen("http://127.0.0.1:9641/metrics", timeout=5).read().decode()
assert "dcmfs_written_bytes_total" in t and "dcmfs_logical_bytes" in t, t[:500]
' && ok metrics || no metrics "no Prometheus figures on 127.0.0.1:9641"

# --- stop: flushed, unmounted, exit 0; files survive a restart ---------------------
check stop systemctl stop dcmfs@test
mounted /srv/pacs && no stop-unmounts "still mounted after stop" || ok stop-unmounts
kill -0 "$PID" 2>/dev/null && no daemon-gone "pid $PID still runs" || ok daemon-gone
grep -q '^success exited 0$' /run/dcmfs-stop-test && ok stop-exit-0 || no stop-exit-0 "$(cat /run/dcmfs-stop-test)"
check restart-start systemctl start dcmfs@test
[ "$(cat /srv/pacs/one.dcm 2>&1)" = "study one" ] && [ "$(sha256sum /srv/pacs/dir/big | cut -d' ' -f1)" = "$sha_big" ] \
    && ok survives-restart || no survives-restart "files differ after stop+start"

# --- a busy mount: stop commits, detaches and exits 0 even with a file held open -----
exec 7</srv/pacs/one.dcm
t0=$(date +%s)
check busy-stop timeout 60 systemctl stop dcmfs@test
[ $(( $(date +%s) - t0 )) -lt 30 ] && ok busy-stop-fast || no busy-stop-fast "stop took $(( $(date +%s) - t0 )) s"
tail -n1 /run/dcmfs-stop-test | grep -q '^success exited 0$' && ok busy-stop-exit-0 || no busy-stop-exit-0 "$(tail -n1 /run/dcmfs-stop-test)"
mounted /srv/pacs && no busy-stop-unmounts "still mounted" || ok busy-stop-unmounts
exec 7<&-

# --- an encrypted credential (systemd-creds, LoadCredentialEncrypted=) -------------------
mkdir -p /etc/credstore.encrypted
check creds-encrypt systemd-creds encrypt --name=dcmfs.key /etc/dcmfs/test.key /etc/credstore.encrypted/dcmfs-test.key
cat > /etc/systemd/system/dcmfs@.service.d/zz-encrypted.conf <<'UNIT'
[Service]
LoadCredential=
LoadCredentialEncrypted=dcmfs.key:/etc/credstore.encrypted/dcmfs-%i.key
UNIT
systemctl daemon-reload
check creds-encrypted-start systemctl start dcmfs@test
[ "$(cat /srv/pacs/one.dcm 2>&1)" = "study one" ] && ok creds-encrypted-data || no creds-encrypted-data "no data"
rm /etc/systemd/system/dcmfs@.service.d/zz-encrypted.conf; systemctl daemon-reload
check creds-encrypted-restart systemctl restart dcmfs@test

# --- a passphrase store, the passphrase as a credential --------------------------------
printf 'correct horse battery staple\n' > /etc/dcmfs/pw.pass; chmod 600 /etc/dcmfs/pw.pass
mkdir -p /srv/pwmnt /etc/systemd/system/dcmfs@pw.service.d
printf 'store = "/srv/dcmfs/pw"\nmountpoint = "/srv/pwmnt"\n[key]\npassphrase_credential = "dcmfs.passphrase"\n' > /etc/dcmfs/pw.toml
printf '[Service]\nLoadCredential=\nLoadCredential=dcmfs.passphrase:/etc/dcmfs/pw.pass\n' > /etc/systemd/system/dcmfs@pw.service.d/pass.conf
systemctl daemon-reload
check pass-init $D init /srv/dcmfs/pw --passphrase-file /etc/dcmfs/pw.pass
check pass-start systemctl start dcmfs@pw
mounted /srv/pwmnt && ok pass-mounted || no pass-mounted "not mounted"
check pass-stop systemctl stop dcmfs@pw

# --- a crash: Restart=on-failure, the unclean store is recovered -------------------
PID=$(systemctl show -p MainPID --value dcmfs@test)
kill -9 "$PID"
for i in $(seq 1 100); do
    n=$(systemctl show -p MainPID --value dcmfs@test)
    [ "$n" != 0 ] && [ "$n" != "$PID" ] && systemctl is-active -q dcmfs@test && break; sleep 0.1
done
systemctl is-active -q dcmfs@test && mounted /srv/pacs && [ "$(cat /srv/pacs/one.dcm 2>&1)" = "study one" ] \
    && ok restart-after-crash || no restart-after-crash "$(systemctl is-active dcmfs@test)"
journalctl -u dcmfs@test -o cat --no-pager | grep -q "not cleanly unmounted\|recovered after an unclean" \
    && ok unclean-check || no unclean-check "no recovery line in the journal"

# --- a dependent PACS-like unit starts after the mount, stops with it --------------
check stop-for-pacs systemctl stop dcmfs@test
cat > /etc/systemd/system/pacs.service <<'UNIT'
[Unit]
Description=a PACS stand-in
[Service]
ExecStart=/bin/sh -c 'findmnt -n -o FSTYPE --mountpoint /srv/pacs > /run/pacs-saw; echo from-pacs > /srv/pacs/pacs.txt; exec sleep infinity'
UNIT
mkdir -p /etc/systemd/system/pacs.service.d
sed 's/dcmfs@pacs/dcmfs@test/; s#/srv/pacs#/srv/pacs#' /usr/local/lib/python3.11/dist-packages/dcmfs/systemd/orthanc-dcmfs.conf \
    > /etc/systemd/system/pacs.service.d/dcmfs.conf
systemctl daemon-reload
cursor=$(journalctl -n0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p')
check pacs-start systemctl start pacs.service
for i in $(seq 1 50); do [ -s /run/pacs-saw ] && break; sleep 0.1; done  # Type=simple: it runs on
[ "$(cat /run/pacs-saw 2>&1)" = fuse.dcmfs ] && ok pacs-after-mount || no pacs-after-mount "PACS saw '$(cat /run/pacs-saw 2>&1)'"
systemctl stop dcmfs@test
systemctl is-active -q pacs.service && no pacs-stops-with-mount "pacs still active" || ok pacs-stops-with-mount
# both in one transaction, as at shutdown: the PACS is stopped before dcmfs stops
systemctl start pacs.service
systemctl stop pacs.service dcmfs@test.service
journalctl --after-cursor="$cursor" -o cat --no-pager _PID=1 | grep -E '(Start|Stopp)(ing|ed) (pacs|dcmfs@test)' > /results/pacs-order.txt
python3 - <<'PY' && ok pacs-order || no pacs-order "$(tr '\n' '|' < /results/pacs-order.txt)"
lines = open("/results/pacs-order.txt").read().splitlines()
def first(prefix):
    return next(i for i, l in enumerate(lines) if l.startswith(prefix))
assert first("Started dcmfs@test") < first("Started pacs")      # start: mount first
last_stop = max(i for i, l in enumerate(lines) if l.startswith("Stopping dcmfs@test"))
assert max(i for i, l in enumerate(lines) if l.startswith("Stopped pacs")) < last_stop  # stop: PACS first
PY

# --- the backing store on its own mount: RequiresMountsFor= in a drop-in -------------------
mkdir -p /srv/backing-src /srv/backing /srv/bkmnt /etc/systemd/system/dcmfs@bk.service.d
printf '[Mount]\nWhat=/srv/backing-src\nWhere=/srv/backing\nType=none\nOptions=bind\n' > /etc/systemd/system/srv-backing.mount
printf '[Unit]\nRequiresMountsFor=/srv/backing/store\n' > /etc/systemd/system/dcmfs@bk.service.d/backing.conf
sed 's#/srv/dcmfs/test#/srv/backing/store#; s#/srv/pacs#/srv/bkmnt#' /etc/dcmfs/test.toml | sed '/metrics/d' > /etc/dcmfs/bk.toml
cp /etc/dcmfs/test.key /etc/dcmfs/bk.key
check backing-init $D init /srv/backing-src/store --key-file /etc/dcmfs/bk.key
systemctl daemon-reload
check backing-start systemctl start dcmfs@bk
systemctl is-active -q srv-backing.mount && mounted /srv/bkmnt && ok backing-mounted-first \
    || no backing-mounted-first "srv-backing.mount $(systemctl is-active srv-backing.mount)"
check backing-stop systemctl stop srv-backing.mount
systemctl is-active -q dcmfs@bk && no backing-stops-dcmfs "dcmfs@bk still active" || ok backing-stops-dcmfs
mounted /srv/bkmnt && no backing-unmounted "still mounted" || ok backing-unmounted
systemd-analyze security dcmfs@test.service --no-pager > /results/security.txt 2>&1
echo "info security $(grep -o 'Overall exposure level.*' /results/security.txt | tr -d '\033' | sed 's/\[[0-9;]*m//g')" >> "$R"

# --- a wrong credential: the unit fails with a clear journal line, no restart loop ---
head -c 32 /dev/urandom > /etc/dcmfs/bad.key; chmod 600 /etc/dcmfs/bad.key
sed 's#/srv/pacs#/srv/badmnt#' /etc/dcmfs/test.toml | sed '/metrics/d' > /etc/dcmfs/bad.toml
mkdir -p /srv/badmnt
systemctl start dcmfs@bad && no wrong-key-fails "started with a wrong key" || ok wrong-key-fails
journalctl -u dcmfs@bad -o cat --no-pager | tee /results/journal-bad.txt | grep -q "The key does not open the store" \
    && ok wrong-key-journal || no wrong-key-journal "no clear line"
journalctl -u dcmfs@bad -o json --no-pager | python3 -c '
import json, sys
assert any("The key does not open" in str(r.get("MESSAGE")) and r.get("PRIORITY") == "3"
           for r in map(json.loads, sys.stdin))' && ok wrong-key-priority || no wrong-key-priority "not PRIORITY=3"
[ "$(systemctl show -p NRestarts --value dcmfs@bad)" = 0 ] && ok wrong-key-no-restart \
    || no wrong-key-no-restart "NRestarts=$(systemctl show -p NRestarts --value dcmfs@bad)"
mounted /srv/badmnt && no wrong-key-no-mount "mounted" || ok wrong-key-no-mount

# --- hardening candidates, one at a time on top of the shipped unit ---------------
# "info probe SETTING started=yes|no visible=yes|no": does the unit start, and is
# its mount visible in PID 1's mount namespace (where the PACS looks)?
for setting in MemoryDenyWriteExecute=yes NoNewPrivileges=yes ProtectClock=yes ProtectKernelLogs=yes \
        ProtectSystem=strict ProtectHome=yes PrivateTmp=yes PrivateDevices=yes PrivateMounts=yes \
        ProtectKernelTunables=yes ProtectKernelModules=yes ProtectControlGroups=yes ProtectProc=invisible \
        PrivateNetwork=yes; do
    mkdir -p /run/systemd/system/dcmfs@test.service.d
    printf '[Service]\n%s\n' "$setting" > /run/systemd/system/dcmfs@test.service.d/probe.conf
    systemctl daemon-reload
    started=no; visible=no
    systemctl start dcmfs@test && started=yes
    [ "$started" = yes ] && mounted /srv/pacs && [ "$(cat /srv/pacs/one.dcm 2>/dev/null)" = "study one" ] && visible=yes
    echo "info probe $setting started=$started visible=$visible" >> "$R"
    systemctl stop dcmfs@test; systemctl reset-failed dcmfs@test 2>/dev/null
    mounted /srv/pacs && umount -l /srv/pacs
done
rm -rf /run/systemd/system/dcmfs@test.service.d; systemctl daemon-reload

# --- fstab and .mount: mount.fuse.dcmfs, config=, umount ---------------------------
head -c 32 /dev/urandom > /etc/dcmfs/fs.key; chmod 600 /etc/dcmfs/fs.key
mkdir -p /srv/fsmnt
cat > /etc/dcmfs/fs.toml <<'TOML'
store = "/srv/dcmfs/fs"
mountpoint = "/srv/fsmnt"
[key]
file = "/etc/dcmfs/fs.key"
TOML
check fs-init $D init --config /etc/dcmfs/fs.toml
# x-systemd.requires-mounts-for= stands for the backing store's filesystem (srv-backing.mount)
echo "/srv/dcmfs/fs /srv/fsmnt fuse.dcmfs config=/etc/dcmfs/fs.toml,_netdev,nofail,x-systemd.requires-mounts-for=/srv/backing 0 0" >> /etc/fstab
systemctl daemon-reload
check mount-unit-start systemctl start srv-fsmnt.mount
mounted /srv/fsmnt && ok mount-unit-live || no mount-unit-live "not mounted"
systemctl is-active -q srv-backing.mount && ok mount-unit-requires || no mount-unit-requires "backing not mounted first"
echo via-fstab > /srv/fsmnt/x && [ "$(cat /srv/fsmnt/x)" = via-fstab ] && ok mount-unit-io || no mount-unit-io "io"
journalctl -u srv-fsmnt.mount -o json --no-pager | python3 -c '
import json, sys
assert any("mounted store" in str(r.get("MESSAGE")) and r.get("PRIORITY") == "6"
           for r in map(json.loads, sys.stdin))' && ok mount-unit-journal || no mount-unit-journal "the daemon does not log to the journal"
FSPID=$(cat /srv/dcmfs/fs/lock)
check mount-unit-stop systemctl stop srv-fsmnt.mount
for i in $(seq 1 100); do kill -0 "$FSPID" 2>/dev/null || break; sleep 0.1; done
mounted /srv/fsmnt && no mount-unit-unmounted "still mounted" || ok mount-unit-unmounted
kill -0 "$FSPID" 2>/dev/null && no mount-unit-daemon-exits "pid $FSPID alive" || ok mount-unit-daemon-exits
check mount-cmd mount /srv/fsmnt
[ "$(cat /srv/fsmnt/x 2>&1)" = via-fstab ] && ok mount-cmd-data || no mount-cmd-data "data lost"
FSPID=$(cat /srv/dcmfs/fs/lock)
check umount-cmd umount /srv/fsmnt
for i in $(seq 1 100); do kill -0 "$FSPID" 2>/dev/null || break; sleep 0.1; done
kill -0 "$FSPID" 2>/dev/null && no umount-daemon-exits "pid $FSPID alive" || ok umount-daemon-exits

set +x
journalctl -o short-monotonic --no-pager > /results/journal.txt 2>&1
echo done >> "$R"
