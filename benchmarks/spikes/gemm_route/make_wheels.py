"""Assemble the wheels the GPU call carries into $SPIKE_WHEELS (default: ./wheels) (<= 64 MiB together).

z3-solver's wheel (29 MB) holds libz3.so twice plus a z3 executable; tilelang's libtvm_compiler.so needs only
the library (NEEDED libz3.so.4.15, found through tilelang's ctypes preload of z3/lib/libz3.so, whose SONAME is
libz3.so.4.15; run.sh also adds the libz3.so.4.15 symlink). This script rewrites it as a slim wheel (build tag 1)
with z3/*.py + z3/lib/libz3.so only, and a fresh RECORD.

SPIKE_WHEELS=.gpu/spike21/wheels python3 make_wheels.py   (after pip download of tilelang==0.1.15 and its dependencies)
"""
import base64
import glob
import hashlib
import os
import shutil
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.environ.get("SPIKE_WHEELS", os.path.join(HERE, "wheels"))
LIMIT = 64 * 2**20


def record_line(name, data):
    h = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={h},{len(data)}"


def slim_z3(src, dst_dir):
    zin = zipfile.ZipFile(src)
    base = os.path.basename(src)  # z3_solver-4.15.4.0-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
    name, ver, rest = base.split("-", 2)
    dst = os.path.join(dst_dir, f"{name}-{ver}-1-{rest}")
    keep, records = [], []
    distinfo = None
    for info in zin.infolist():
        n = info.filename
        if n.endswith("/"):
            continue
        if ".data/" in n or n.startswith("z3/include/") or n == "z3/lib/libz3.so.4.15":
            continue
        if ".dist-info/" in n:
            distinfo = n.split("/")[0]
            if n.endswith("/RECORD"):
                continue
        keep.append(info)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for info in keep:
            data = zin.read(info)
            zi = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            zi.external_attr = info.external_attr
            zi.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(zi, data, compresslevel=9)
            records.append(record_line(info.filename, data))
        records.append(f"{distinfo}/RECORD,,")
        zout.writestr(f"{distinfo}/RECORD", "\n".join(records) + "\n")
    return dst


def main():
    os.makedirs(OUT, exist_ok=True)
    for f in glob.glob(os.path.join(OUT, "*.whl")):
        os.remove(f)
    src = glob.glob(os.path.join(HERE, "whl_tilelang", "tilelang-*.whl"))
    deps = os.path.join(HERE, "whl_tilelang_deps")
    for pat in ("apache_tvm_ffi-*.whl", "ml_dtypes-*.whl", "psutil-*.whl", "tqdm-*.whl", "cloudpickle-*.whl"):
        src += glob.glob(os.path.join(deps, pat))
    for f in src:
        shutil.copy2(f, OUT)
    z3 = glob.glob(os.path.join(deps, "z3_solver-*.whl"))[0]
    slim_z3(z3, OUT)
    total = 0
    for f in sorted(glob.glob(os.path.join(OUT, "*.whl"))):
        sz = os.path.getsize(f)
        total += sz
        print(f"{sz / 2**20:8.2f} MiB  {os.path.basename(f)}")
    print(f"{total / 2**20:8.2f} MiB  total ({total} bytes; limit {LIMIT} = 64 MiB; margin {(LIMIT - total) / 2**20:.2f} MiB)")
    assert total < LIMIT


if __name__ == "__main__":
    main()
