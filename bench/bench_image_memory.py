"""Memory of reading one hostile image: a small PNG of many 16-bit pixels, side by side with the conversion
janus_core used before (a float64 copy of the image, rounded and clipped).

    PYTHONPATH=. .venv/bin/python bench/bench_image_memory.py             # 6300 x 6300, 16-bit greyscale
    PYTHONPATH=. .venv/bin/python bench/bench_image_memory.py --side 4000

Each way runs in a fresh Python process (Linux: the peak, VmHWM, is reset after the imports through
/proc/self/clear_refs) and prints the peak RSS growth over what the process held before, and its CPU seconds:
- `edge check`: what the API process does (`open_image` + `load_image`: the header, then the pixels in the
  file's own mode);
- `worker decode`: what a worker does (`decode_image`: upright RGB, 16-bit converted in bands of rows);
- `float64 reference`: load, a transposed copy, then `np.rint(np.asarray(image, float64) / 257)`, clip,
  uint8, RGB (the code before 2026-12-04, written out here as the reference).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

WAYS = ("edge check", "worker decode", "float64 reference")

MEASURE = r"""
import io, json, sys, time
import numpy as np
from PIL import Image, ImageOps
from janus_core.images import decode_image, load_image, open_image
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
data = open(sys.argv[1], "rb").read()
way = sys.argv[2]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from the current RSS: imports' own peak left out
base = status("VmRSS")
started = time.process_time()
if way == "edge check":
    load_image(open_image(data))
elif way == "worker decode":
    decode_image(data)
else:
    image = Image.open(io.BytesIO(data))
    image.load()
    image = ImageOps.exif_transpose(image)  # a copy, as the code before did
    scaled = np.clip(np.rint(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
    Image.fromarray(scaled).convert("RGB")
grown = (status("VmHWM") - base) / 1024
print(json.dumps({"mib": grown, "cpu": time.process_time() - started}))
"""


def write_png(path: Path, side: int) -> int:
    import numpy as np
    from PIL import Image

    values = np.zeros((side, side), dtype=np.uint16)
    values[::7, ::5] = 40000
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG", optimize=True)
    path.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=6300)
    args = parser.parse_args()
    path = Path(tempfile.mkdtemp()) / "sixteen.png"
    size = write_png(path, args.side)
    print(f"{args.side}x{args.side} 16-bit greyscale PNG, {size / 1024:.0f} KiB")
    results = {}
    for way in WAYS:
        out = subprocess.run([sys.executable, "-c", MEASURE, str(path), way], capture_output=True, text=True,
                             check=True)
        results[way] = json.loads(out.stdout)
        print(f"{way:>18}: peak RSS +{results[way]['mib']:6.0f} MiB, {results[way]['cpu']:.2f} s CPU")
    reference = results["float64 reference"]["mib"]
    for way in WAYS[:2]:
        print(f"{way}: {reference / max(results[way]['mib'], 1):.1f}x less memory than the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
