"""The floor of a metadata request, side by side (issue 17): ``floor`` (the
do-nothing filesystem of tests/floorfs.py served by dcmfs's own adapter),
dcmfs and gocryptfs, interleaved: create (open/write/close), stat, unlink of
N files of 1 KiB in one directory (the loop of bench_workloads.small_files);
per phase files/s (wall) and the daemon's CPU us per file (with its
children).  Not a test and not shipped; run as root from the checkout:

    .venv/bin/python tests/floor_bench.py 5000 3 [floor dcmfs gocryptfs]
"""
import os, sys, time, pathlib, subprocess, shutil, statistics
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))
import psutil
from bench_contenders import Dcmfs, Gocryptfs, Contender

class Floor(Contender):
    name = "floor"
    def __init__(self, base):
        self.base = base / "floor"; self.mp = self.base / "m"; self.proc = None
    def setup(self):
        shutil.rmtree(self.base, ignore_errors=True); self.mp.mkdir(parents=True)
        env = dict(os.environ, PYTHONPATH=str(HERE.parent))
        self.proc = subprocess.Popen([sys.executable, str(HERE / "floorfs.py"), str(self.mp)],
                                     env=env)
        for _ in range(200):
            if os.path.ismount(self.mp): break
            time.sleep(0.05)
        else: raise RuntimeError("floor did not mount")
    def mnt(self): return self.mp
    def pid(self): return self.proc.pid
    def teardown(self):
        subprocess.run(["fusermount3", "-u", str(self.mp)], check=False)
        self.proc.wait(10); shutil.rmtree(self.base, ignore_errors=True)

def cpu(pid):
    p = psutil.Process(pid); t = p.cpu_times(); s = t.user + t.system
    for c in p.children(recursive=True):
        try: ct = c.cpu_times(); s += ct.user + ct.system
        except psutil.Error: pass
    return s

def run(c, n):
    c.setup()
    try:
        d = c.mnt() / "small"; d.mkdir()
        payload = bytes(range(256)) * 4
        names = [d / f"f{i:05d}" for i in range(n)]
        pid = c.pid(); out = {}
        def phase(name, fn):
            c0 = cpu(pid); t = time.perf_counter()
            for p in names: fn(p)
            w = time.perf_counter() - t; out[name] = (n / w, (cpu(pid) - c0) / n * 1e6)
        def create(p):
            with open(p, "wb") as f: f.write(payload)
        phase("create", create); phase("stat", os.stat); phase("unlink", os.unlink)
        return out
    finally:
        c.teardown()

if __name__ == "__main__":
    n = int(sys.argv[1]); reps = int(sys.argv[2]); which = sys.argv[3:] or ["floor", "dcmfs", "gocryptfs"]
    base = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "dcmfs-floor-bench"; base.mkdir(parents=True, exist_ok=True)
    cs = {"floor": Floor(base), "dcmfs": Dcmfs(base), "gocryptfs": Gocryptfs(base)}
    res = {k: [] for k in which}
    for r in range(reps):
        for k in which:
            load = os.getloadavg()[0]
            o = run(cs[k], n); res[k].append(o)
            print(f"rep {r} {k:10s} load {load:.2f} " + "  ".join(f"{ph} {v[0]:7.0f}/s {v[1]:6.0f}us" for ph, v in o.items()), flush=True)
    print("medians:")
    for k in which:
        print(f"{k:10s} " + "  ".join(f"{ph} {statistics.median(o[ph][0] for o in res[k]):7.0f}/s {statistics.median(o[ph][1] for o in res[k]):6.0f}us" for ph in ("create","stat","unlink")))
