"""The contenders of the benchmark and what measures them: a plain directory,
dcmfs through a real mount, gocryptfs, and the published per-file pipeline
(base64 -> LZMA -> AES in one process); the psutil sampler of a daemon's CPU
seconds and peak RSS."""

from __future__ import annotations

import base64
import json
import lzma
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import psutil
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench_data import MODALITIES

def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass  # not root: reads are warm, which only flatters the contenders equally



class Sampler:
    """Peak RSS and CPU seconds of one process and its children (dcmfs's
    parser workers) while a workload runs."""

    def __init__(self, pid: int | None) -> None:
        self.proc = psutil.Process(pid) if pid else None
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _family(self) -> list:
        try:
            return [self.proc] + self.proc.children(recursive=True)
        except psutil.Error:
            return [self.proc]

    def _sample(self) -> bool:
        try:
            rss = self.proc.memory_info().rss
            self._last_cpu = self.cpu()
        except psutil.Error:
            return False
        for child in self._family()[1:]:
            try:
                rss += child.memory_info().rss
            except psutil.Error:
                pass
        self.peak = max(self.peak, rss)
        return True

    def _run(self) -> None:
        while not self._stop.is_set() and self._sample():
            time.sleep(0.05)

    def cpu(self) -> float:
        if self.proc is None:
            return 0.0
        if not self.proc.is_running():  # a daemon that ended meanwhile (dcmfs-wonly)
            return getattr(self, "_last_cpu", 0.0)
        total = 0.0
        for proc in self._family():
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system
        return total

    def __enter__(self):
        self.cpu0 = self._last_cpu = self.cpu()
        if self.proc:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.proc:
            self._sample()  # a workload shorter than one period still has its figure
        self.cpu_seconds = self.cpu() - self.cpu0



def du(path: pathlib.Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except OSError:
                pass
    return total


# --- contenders -------------------------------------------------------------------------
class Contender:
    def before_write(self):
        """Called right before the timed writes (nothing by default)."""

    def after_write(self):
        """Called when the timed writes are done, before settle (nothing by default)."""

    def settle(self, poll: float = 0.02):
        """Wait until the contender's background work is done (nothing by default)."""

    def status(self) -> dict | None:
        """The daemon's live figures, when it has any."""
        return None

    def modality_stats(self, every: bool = False) -> dict | None:
        """modality -> (logical bytes, stored bytes), when the contender knows;
        CT, MR, CR and US only unless ``every``."""
        return None


class Plain(Contender):
    name = "plain"

    def __init__(self, base):
        self.dir = base / "plain"

    def setup(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir()

    def mnt(self):
        return self.dir

    def remount(self):
        drop_caches()

    def pid(self):
        return None

    def stored(self):
        return du(self.dir)

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)


class Dcmfs(Contender):
    """spec: zstd (the default policy: DICOM-aware background re-encoder),
    paused (the same, re-encoder paused while the files are written), dicom0
    (-o dicom=0: the re-encoder compresses with zstd only), j2k (the image
    codecs offered each frame include OpenJPEG's JPEG 2000: smallest, slow
    to decode), htj2k (HTJ2K only: fastest to decode), inproc (-o sandbox=0: the
    DICOM analysis and image encoders in the daemon, not in worker processes),
    audit0 (-o audit=0: no audit trail), cold (-o hot_days=0: DICOM coded
    densely at once, what a study reads like once it has turned cold),
    inline (zstd compressed at close, no re-encoder), lzma, zstd:N (level N),
    rotating (the default policy while the daemon re-encrypts older key
    epochs: the store holds BALLAST_MIB of files at rest, and each write starts
    with 'dcmfs key rotate' and 'rotate --finish' on the mounted store; at rest
    includes the end of that job, the stored size leaves the ballast out), wonly
    (a write-only mount, -o recipient=FILE: the writer has only the store's
    public key; at rest includes its unmount, the import by a keyed mount and
    that mount's re-encoding; ingest CPU is the write-only daemon's)."""

    #: MiB of random files a rotating contender's store holds before the
    #: write, which the rotation's --finish has to re-encrypt meanwhile
    BALLAST_MIB = 192

    #: seconds the backlog may stand still before settle gives up
    STALL_S = 300

    def __init__(self, base, spec="zstd"):
        self.name = "dcmfs" if spec == "zstd" else f"dcmfs-{spec}"
        codec, _, level = spec.partition(":")
        self.options = ["-o", f"zstd_level={level}"] if level else []
        self.paused = codec == "paused"
        self.rotating = codec == "rotating"
        self.wonly = codec == "wonly"
        self.ingesting = False
        self.ballast = 0
        self._finish = None
        if codec == "inline":
            self.options = ["-o", "reencode=0"]
        elif codec == "dicom0":
            self.options = ["-o", "dicom=0"]
        elif codec == "j2k":
            self.options = ["-o", "image_codecs=htj2k+jpegxl+jpeg2k"]
        elif codec == "htj2k":
            self.options = ["-o", "image_codecs=htj2k"]
        elif codec == "inproc":
            self.options = ["-o", "sandbox=0"]
        elif codec == "audit0":
            self.options = ["-o", "audit=0"]
        elif codec == "cold":
            self.options = ["-o", "hot_days=0"]
        if codec in ("inline", "dicom0", "paused", "j2k", "htj2k", "inproc", "audit0",
                     "rotating", "cold", "wonly"):
            codec = "zstd"
        self.codec = codec
        self.base = base / self.name
        self.store, self.key, self.mp = self.base / "store", self.base / "key", self.base / "mnt"

    def cli(self, *args):
        subprocess.run([sys.executable, "-m", "dcmfs.cli", *map(str, args)], check=True,
                       stdout=subprocess.DEVNULL)

    def setup(self):
        shutil.rmtree(self.base, ignore_errors=True)
        self.mp.mkdir(parents=True)
        self.cli("init", self.store, "--key-file", self.key, "--codec", self.codec)
        if self.wonly:
            rcp = self.base / "recipient.json"
            self.cli("key", "recipient", self.store, "--key-file", self.key, "--export", rcp)
            self.cli("mount", self.store, self.mp, "-o", f"recipient={rcp}")
            self.ingesting = True
            return
        self.cli("mount", self.store, self.mp, "--key-file", self.key, *self.options)
        if self.rotating:
            (self.mp / ".ballast").mkdir()
            for i in range(self.BALLAST_MIB // 16):
                (self.mp / ".ballast" / f"b{i}").write_bytes(os.urandom(16 << 20))
            self.settle()
            self.ballast = self.stored()

    def mnt(self):
        return self.mp

    def remount(self):
        self.cli("umount", self.mp)
        drop_caches()
        self.cli("mount", self.store, self.mp, "--key-file", self.key, *self.options)

    def pid(self):
        from dcmfs.storage.header import lock_holders, read_lock_pid
        if self.ingesting:  # the write-only daemon holds its inbox session's lock
            for d in (self.store / "inbox").iterdir():
                holders = lock_holders(str(d)) or set()
                if holders:
                    return max(holders)
            return None
        return read_lock_pid(str(self.store))

    def _to_keyed(self):
        """Unmount the write-only mount; a keyed mount imports what it wrote."""
        pid = self.pid()
        self.cli("umount", self.mp)
        while pid and psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie":
            time.sleep(0.02)
        self.ingesting = False
        self.cli("mount", self.store, self.mp, "--key-file", self.key, *self.options)

    def stored(self):
        return du(self.store / "objects") + du(self.store / "index") - self.ballast

    def control(self, command: bytes):
        from dcmfs.format import CONTROL_XATTR
        os.setxattr(self.mp, CONTROL_XATTR, command)

    def before_write(self):
        if self.paused:
            self.control(b"pause")
        if self.rotating:  # a new epoch at once, the older one re-encrypted meanwhile
            self.cli("key", "rotate", self.store, "--key-file", self.key)
            self._finish = subprocess.Popen(
                [sys.executable, "-m", "dcmfs.cli", "key", "rotate", "--finish",
                 str(self.store), "--key-file", str(self.key)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def after_write(self):
        if self.paused:
            self.control(b"resume")

    def status(self):
        if self.ingesting:
            return None
        from dcmfs.format import STATUS_XATTR
        return json.loads(os.getxattr(self.mp, STATUS_XATTR))

    def modality_stats(self, every: bool = False):
        from dcmfs.format import STATS_XATTR
        out: dict[str, list[int]] = {}
        for g in json.loads(os.getxattr(self.mp, STATS_XATTR))["groups"]:
            if every or g["modality"] in MODALITIES:
                acc = out.setdefault(g["modality"], [0, 0])
                acc[0] += g["logical_bytes"]
                acc[1] += g["stored_bytes"]
        return out

    def settle(self, poll: float = 0.02):
        """Wait until the background re-encoder has re-encoded everything
        (and a rotation's --finish has ended); ``poll``: seconds between
        looks at the status."""
        if self.ingesting:
            self._to_keyed()
        if self._finish is not None:
            if self._finish.wait(timeout=self.STALL_S) != 0:
                raise RuntimeError(f"{self.name}: 'dcmfs key rotate --finish' failed")
            self._finish = None
        last, since = None, time.monotonic()
        while True:
            st = self.status()
            if not st["backlog_files"]:
                break
            progress = (st["backlog_files"], st["backlog_bytes"], st["reencoded_files"])
            if progress != last:
                last, since = progress, time.monotonic()
            elif time.monotonic() - since > self.STALL_S:
                raise RuntimeError(f"{self.name}: the backlog stands still: {st}")
            time.sleep(poll)
        # fsync of the root directory checkpoints the index, which lets the
        # superseded uncompressed objects go (else they stay until the next
        # timed checkpoint, up to 5 s later)
        fd = os.open(self.mp, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def teardown(self):
        self.cli("umount", self.mp)
        shutil.rmtree(self.base, ignore_errors=True)


class Gocryptfs(Contender):
    name = "gocryptfs"

    def __init__(self, base):
        self.base = base / "gocryptfs"
        self.cipher, self.mp, self.pw = self.base / "c", self.base / "m", self.base / "pw"

    def setup(self):
        shutil.rmtree(self.base, ignore_errors=True)
        self.cipher.mkdir(parents=True)
        self.mp.mkdir()
        self.pw.write_text("benchmark passphrase\n")
        subprocess.run(["gocryptfs", "-init", "-q", "-scryptn", "10", "-passfile", str(self.pw),
                        str(self.cipher)], check=True)
        self._mount()

    def _mount(self):
        subprocess.run(["gocryptfs", "-q", "-nosyslog", "-passfile", str(self.pw), str(self.cipher),
                        str(self.mp)], check=True)

    def mnt(self):
        return self.mp

    def remount(self):
        subprocess.run(["fusermount3", "-u", str(self.mp)], check=True)
        drop_caches()
        self._mount()

    def pid(self):
        for p in psutil.process_iter(["name", "cmdline"]):
            if p.info["name"] == "gocryptfs" and str(self.mp) in (p.info["cmdline"] or []):
                return p.pid
        return None

    def stored(self):
        return du(self.cipher)

    def teardown(self):
        subprocess.run(["fusermount3", "-u", str(self.mp)], check=False)
        shutil.rmtree(self.base, ignore_errors=True)


def published_method(files) -> dict:
    """base64 -> LZMA -> AES per file, in one process (the study's pipeline):
    per file its seconds, CPU seconds and this process's RSS after it."""
    key = AESGCM.generate_key(bit_length=256)
    aes = AESGCM(key)
    me = psutil.Process()
    lat, cpu, rss, stored, logical, sizes = [], [], [], 0, 0, {}
    for p in files:
        data = p.read_bytes()
        c = time.process_time()
        t = time.perf_counter()
        packed = lzma.compress(base64.b64encode(data), preset=6)
        nonce = os.urandom(12)
        sealed = nonce + aes.encrypt(nonce, packed, None)
        lat.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        rss.append(me.memory_info().rss)
        stored += len(sealed)
        logical += len(data)
        sizes[p.name] = (len(data), len(sealed))
    return {"lat": lat, "cpu": cpu, "rss": rss, "stored": stored, "logical": logical,
            "sizes": sizes}


def lzma_only(files) -> dict:
    """Plain LZMA (xz preset 6) per file, no base64, no encryption."""
    spent, stored, logical = 0.0, 0, 0
    for p in files:
        data = p.read_bytes()
        t = time.perf_counter()
        stored += len(lzma.compress(data, preset=6))
        spent += time.perf_counter() - t
        logical += len(data)
    return {"ratio": stored / logical, "mb_s": logical / 1e6 / spent}

