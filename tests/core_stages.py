"""Where a small file's create and unlink spend the core's CPU (issue 17):
the loop of bench_workloads.small_files driven through a core without a
kernel, with the requests the kernel sends per file (GETATTR of the
directory, LOOKUP of the new name, CREATE, GETXATTR security.capability,
WRITE, FLUSH, RELEASE; GETATTR of the directory and UNLINK), each request
and the stages inside it timed by the calling thread's CPU clock.  Not a
test and not shipped; run from the checkout:

    PYTHONPATH=. .venv/bin/python tests/core_stages.py 3000 [stages|total|files|inline]

``total``: CPU per file of the whole process (background threads too);
``files``: the same with ``inline_max=0`` (every object a file, as before
format 8's ``inline-small-v1``); ``inline``: the prototype that feature
was built from (before it: the sealed object put raw into the commit's own
index transaction instead of an object file; a no-op since).
"""
import collections, os, shutil, sys, tempfile, time

from dcmfs.audit import trail
from dcmfs.config import Config, KdfParams
from dcmfs.core import contents, filesystem, handles
from dcmfs.index import checks, index, txn as txns
from dcmfs.index.schema import ino_key
from dcmfs.opened.store import OpenedStore
from dcmfs.storage import backend, objects
from dcmfs.storage.header import Secret, init_store, open_store

CPU = collections.Counter()


def timed(cls, name, label):
    real = getattr(cls, name)

    def wrapper(*a, **k):
        t = time.thread_time()
        try:
            return real(*a, **k)
        finally:
            CPU[label] += time.thread_time() - t
    setattr(cls, name, wrapper)


def stages():
    timed(objects.ObjectStore, "_put", "object file write")
    timed(objects.ObjectStore, "seal", "object seal (compress, check, AEAD)")
    timed(contents.FileData, "commit", "content commit")
    timed(index.Index, "_commit_nested", "index commits (journal, LMDB, sums)")
    timed(checks.Checked, "_count", "index sums")
    timed(trail.AuditTrail, "record", "audit records")
    for name in ("put_content", "put_chunk", "put_inode", "lookup", "add_dirent"):
        timed(txns.Txn, name, "txn." + name)


def inline_prototype():
    pending = {}
    objects.ObjectStore._put = lambda self, oid, blob, hold=False: pending.__setitem__(oid, blob)
    put_chunk = txns.Txn.put_chunk

    def put_inline(self, ino, idx, ref):
        put_chunk(self, ino, idx, ref)
        blob = pending.pop(ref.oid, None)
        if blob is not None:  # under the inode's prefix: delete_inode drops it
            self._write("xattrs", ino_key(ino) + b"inline" + ref.oid, blob)
    txns.Txn.put_chunk = put_inline
    delete = backend.LocalBackend.delete

    def no_file(self, name, *a, **k):
        try:
            return delete(self, name, *a, **k)
        except Exception:  # noqa: BLE001 - the prototype wrote no file
            return None
    backend.LocalBackend.delete = no_file


def main():
    n = int(sys.argv[1])
    mode = sys.argv[2] if len(sys.argv) > 2 else "stages"
    if mode == "stages":
        stages()
    elif mode == "inline":
        inline_prototype()
    base = tempfile.mkdtemp(prefix="dcmfs-stages-")
    root, secret = os.path.join(base, "store"), Secret("keyfile", os.urandom(32))
    cfg = Config(kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1),
                 **({"inline_max": 0} if mode == "files" else {}))
    init_store(root, secret, cfg)
    fs = filesystem.FileSystem(OpenedStore(open_store(root, secret, for_writing=True), cfg,
                                           checked=True))
    fs.caller = (0, 0, os.getpid())
    clock = time.thread_time if mode == "stages" else time.process_time

    def req(label, fn, *a):
        t = clock()
        try:
            return fn(*a)
        except Exception:  # noqa: BLE001 - ENOENT / ENODATA, as the kernel hears
            return None
        finally:
            CPU["REQ " + label] += clock() - t
    try:
        fs.mkdir("/small", 0o755, 0, 0)
        payload = bytes(range(256)) * 4
        names = [f"/small/f{i:05d}" for i in range(n)]
        for phase in ("create", "unlink"):
            CPU.clear()
            t = clock()
            for p in names:
                req("GETATTR dir", fs.getattr, "/small")
                if phase == "unlink":
                    req("UNLINK", fs.unlink, p)
                    continue
                req("LOOKUP (new name)", fs.getattr, p)
                fh = req("CREATE", fs.create, p, 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
                req("GETXATTR", fs.getxattr, p, "security.capability")
                req("WRITE", fs.write, fh, payload, 0)
                req("FLUSH", fs.flush, fh)
                req("RELEASE", fs.release, fh)
            print(f"{phase}: {(clock() - t) / n * 1e6:.0f} us CPU per file ({mode})")
            if mode == "stages":
                for k, v in sorted(CPU.items(), key=lambda kv: -kv[1]):
                    print(f"  {k:40s} {v / n * 1e6:6.0f} us")
    finally:
        fs.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
