"""The GPU check's output: one markdown table (stdout and `$OUT/gpu.md`) and its JSON twin (`$OUT/gpu.json`).

Rows come from `bench.gpu.measure.Row`; a section that failed or was skipped still has its rows,
with the reason in `note`, so the table always has the same shape. `x ref` is filled here: an
engine row's rate over transformers' rate on the same shape (image rows against the image
reference, understanding rows against the text one). This module knows formatting, not measuring.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from bench.gpu.measure import Row

COLUMNS = ["shape", "section", "mode", "c", "ms/step", "host ms", "rate", "TTFT s", "peak GiB", "roof ms",
           "of roof", "x ref", "note"]
REFERENCE_OF = {"generate": "transformers image", "understand": "transformers text"}


def fill_ratios(rows: list[Row]) -> None:
    refs = {(r.shape, r.section): r.rate for r in rows if r.section in REFERENCE_OF.values() and r.rate}
    for r in rows:
        ref = refs.get((r.shape, REFERENCE_OF.get(r.section, "")))
        if ref and r.rate is not None:
            r.x_ref = r.rate / ref


def _num(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def cells(r: Row) -> list[str]:
    rate = "-" if r.rate is None else f"{_num(r.rate)} {r.unit}"
    return [r.shape, r.section, r.mode, "-" if r.c is None else str(r.c), _num(r.ms_step), _num(r.host_ms), rate,
            _num(r.ttft_s, 3), _num(r.peak_gib, 1), _num(r.roof_ms), _num(r.of_roof), _num(r.x_ref),
            r.note.replace("|", "/")]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def markdown(meta: dict, rows: list[Row], sections: list[dict]) -> str:
    head = [f"# janus-server GPU check, {meta['date']}", "",
            f"device: {meta['device']}; torch {meta['torch']}; transformers {meta['transformers']}; "
            f"dtype {meta['dtype']}; copy bandwidth {meta['bandwidth_gbs']:.1f} GB/s",
            f"command: `{meta['command']}`", ""]
    done = ", ".join(f"{s['name']} {s['status']} {s['seconds']:.0f}/{s['estimate_s']:.0f} s" for s in sections)
    tail = ["", f"sections (status, actual/estimated seconds): {done}",
            f"total {meta['elapsed_s']:.0f} s (dry estimate {meta['estimate_s']:.0f} s, budget {meta['budget_s']})"]
    return "\n".join(head) + table(rows) + "\n" + "\n".join(tail) + "\n"


def as_json(meta: dict, rows: list[Row], sections: list[dict]) -> str:
    return json.dumps({"meta": meta, "columns": COLUMNS, "rows": [asdict(r) for r in rows], "sections": sections},
                      indent=2, default=str)


def write(out: Path, meta: dict, rows: list[Row], sections: list[dict]) -> None:
    """`gpu.md` and `gpu.json` under `out`, written whole each time (a killed run leaves the last complete pair)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu.md", markdown(meta, rows, sections)), ("gpu.json", as_json(meta, rows, sections))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
