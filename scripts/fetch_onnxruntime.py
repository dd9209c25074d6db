#!/usr/bin/env python3
"""Installs ONNX Runtime's shared library from the PyPI `onnxruntime` wheel where Parley
finds it without any variable set: ~/.cache/parley/onnxruntime/ (or $XDG_CACHE_HOME/parley/
onnxruntime/). The wheel's hash is checked against PyPI's; only the library is kept.
Standard library only (setup runs before any Python environment exists). Idempotent."""
import hashlib
import io
import json
import os
import platform
import sys
import urllib.request
import zipfile

VERSION = "1.32.0"


def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "parley", "onnxruntime")


def wheel_tag():
    machine = platform.machine().lower()
    if sys.platform.startswith("linux"):
        return "manylinux", {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(machine)
    if sys.platform == "darwin":
        return "macosx", "arm64" if machine == "arm64" else "x86_64"
    return None, None


def main():
    out_dir = cache_dir()
    name = "libonnxruntime.dylib" if sys.platform == "darwin" else "libonnxruntime.so"
    target = os.path.join(out_dir, name)
    stamp = os.path.join(out_dir, "VERSION")
    if os.path.exists(target) and os.path.exists(stamp) and open(stamp).read().strip() == VERSION:
        print(f"onnxruntime {VERSION}: already in {out_dir}")
        return
    os_tag, arch = wheel_tag()
    if os_tag is None or arch is None:
        sys.exit(f"fetch_onnxruntime: no onnxruntime wheel known for {sys.platform}/{platform.machine()}")
    # PyPI's simple index in its JSON form (PEP 691): file names, URLs and hashes.
    req = urllib.request.Request(
        "https://pypi.org/simple/onnxruntime/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        meta = json.load(r)
    files = [
        f
        for f in meta["files"]
        if f["filename"].startswith(f"onnxruntime-{VERSION}-")
        and f["filename"].endswith(".whl")
        and os_tag in f["filename"]
        and arch in f["filename"]
    ]
    if not files:
        sys.exit(f"fetch_onnxruntime: onnxruntime {VERSION} has no {os_tag} {arch} wheel")
    f = sorted(files, key=lambda f: f["filename"])[-1]
    with urllib.request.urlopen(f["url"], timeout=300) as r:
        data = r.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != f["hashes"]["sha256"]:
        sys.exit(f"fetch_onnxruntime: {f['filename']} has sha256 {digest}, PyPI says {f['hashes']['sha256']}")
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        libs = [n for n in z.namelist() if "/capi/libonnxruntime" in n and not n.endswith("providers_shared.so")]
        if not libs:
            sys.exit(f"fetch_onnxruntime: no libonnxruntime in {f['filename']}")
        lib = sorted(libs, key=len)[-1]
        os.makedirs(out_dir, exist_ok=True)
        tmp = target + ".part"
        with open(tmp, "wb") as o:
            o.write(z.read(lib))
        os.replace(tmp, target)
    with open(stamp + ".part", "w") as o:
        o.write(VERSION + "\n")
    os.replace(stamp + ".part", stamp)
    print(f"onnxruntime {VERSION}: {lib} from {f['filename']} -> {target}")


if __name__ == "__main__":
    main()
