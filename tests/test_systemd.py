"""dcmfs under a real systemd: a booted systemd-nspawn container.

``scripts/systemd-test`` boots systemd as PID 1 of a container on a cached
debootstrapped Debian root (``scripts/systemd-image`` builds it once, ~75 s,
into /var/cache/dcmfs-test), installs this dcmfs there with
``dcmfs install-systemd`` and runs ``tests/systemd/scenario.sh``; each check
of the scenario is one test here.  Warm, the whole run takes ~20 s.

The tests are skipped, with the reason printed (``-rs``), when the machine
cannot run the container (not root, no /dev/fuse, no image and none can be
built).  ``DCMFS_SYSTEMD_TEST=require`` turns such a skip into a failure;
``DCMFS_SYSTEMD_TEST=0`` skips on purpose.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

#: ./scripts/test --quick leaves it out (boots a container: ~25 s warm, ~80 s loaded)
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parent.parent

#: every check of tests/systemd/scenario.sh, in order
CHECKS = """boot-active boot-pacs-after-mount boot-order boot-stop boot-unmounted install unit-verify init start live-after-start write-read same-mount-namespace
cap-bounding-set no-new-privs-off seccomp-filter personality parser-worker-nobody parser-worker-nice
parser-worker-codes parser-worker-confined status-text journal-priority
dcmfs-status metrics stop stop-unmounts daemon-gone stop-exit-0 restart-start survives-restart
busy-stop busy-stop-fast busy-stop-exit-0 busy-stop-unmounts creds-encrypt creds-encrypted-start
creds-encrypted-data creds-encrypted-restart pass-init pass-start pass-mounted pass-stop
restart-after-crash unclean-check stop-for-pacs pacs-start pacs-after-mount pacs-stops-with-mount pacs-order
backing-init backing-start backing-mounted-first backing-stop backing-stops-dcmfs backing-unmounted
wrong-key-fails wrong-key-journal wrong-key-priority wrong-key-no-restart wrong-key-no-mount
fs-init mount-unit-start mount-unit-live mount-unit-requires mount-unit-io mount-unit-journal mount-unit-stop mount-unit-unmounted
mount-unit-daemon-exits mount-cmd mount-cmd-data umount-cmd umount-daemon-exits""".split()

#: hardening settings the unit leaves out because, in the booted container,
#: the service then fails to mount or its mount is invisible to the host
HIDES_OR_BREAKS = ["ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                   "PrivateDevices=yes", "PrivateMounts=yes", "ProtectKernelTunables=yes",
                   "ProtectKernelModules=yes", "ProtectControlGroups=yes", "ProtectKernelLogs=yes",
                   "ProtectProc=invisible"]


def _unavailable(reason: str):
    if os.environ.get("DCMFS_SYSTEMD_TEST") == "require":
        pytest.fail(f"systemd test required but cannot run: {reason}")
    pytest.skip(f"systemd test NOT RUN: {reason}")


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> dict:
    if os.environ.get("DCMFS_SYSTEMD_TEST") == "0":
        _unavailable("DCMFS_SYSTEMD_TEST=0")
    if os.geteuid() != 0:
        _unavailable("needs root (systemd-nspawn)")
    if not os.path.exists("/dev/fuse"):
        _unavailable("no /dev/fuse")
    if not os.path.isdir("/sys/fs/cgroup/unified") and not os.path.exists(
            "/sys/fs/cgroup/cgroup.procs"):
        _unavailable("no cgroup hierarchy for nspawn")
    image = subprocess.run([str(REPO / "scripts/systemd-image")], capture_output=True,
                           text=True, timeout=900)
    if image.returncode != 0:
        _unavailable(f"no cached root and it cannot be built: {image.stderr.strip()[-400:]}")
    results = tmp_path_factory.mktemp("systemd")
    run = subprocess.run([str(REPO / "scripts/systemd-test"), str(results)],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "DCMFS_PYTHON": sys.executable})
    sys.stderr.write(run.stderr)
    out = {"ok": set(), "not ok": {}, "info": [], "done": False, "dir": results,
           "stdout": run.stdout}
    for line in run.stdout.splitlines():
        if line.startswith("ok "):
            out["ok"].add(line[3:].strip())
        elif line.startswith("not ok "):
            name, _, why = line[7:].partition(":")
            out["not ok"][name.strip()] = why.strip()
        elif line.startswith("info "):
            out["info"].append(line[5:])
        elif line.strip() == "done":
            out["done"] = True
    return out


def test_scenario_ran_to_the_end(scenario):
    assert scenario["done"], (f"the scenario did not finish; see {scenario['dir']}:\n"
                              + scenario["stdout"][-2000:])
    unknown = (scenario["ok"] | set(scenario["not ok"])) - set(CHECKS)
    assert not unknown, f"checks missing from CHECKS: {unknown}"


@pytest.mark.parametrize("check", CHECKS)
def test_in_systemd(scenario, check):
    if check in scenario["not ok"]:
        pytest.fail(f"{check}: {scenario['not ok'][check]} (logs in {scenario['dir']})")
    assert check in scenario["ok"], f"{check} did not run (logs in {scenario['dir']})"


def test_dropped_hardening_really_hides_or_breaks_the_mount(scenario):
    probes = {}
    for line in scenario["info"]:
        if line.startswith("probe "):
            setting, *flags = line[6:].split()
            probes[setting] = dict(f.split("=") for f in flags)
    for setting in HIDES_OR_BREAKS:
        assert setting in probes, setting
        p = probes[setting]
        assert p["started"] == "no" or p["visible"] == "no", (setting, p)
    # the kept MemoryDenyWriteExecute= works with mfusepy's ctypes callbacks
    assert probes["MemoryDenyWriteExecute=yes"] == {"started": "yes", "visible": "yes"}
