"""The GPU check: every figure we need from a borrowed GPU, in one command and one table.

    bench/gpu/run.sh                                  # 1B and 7B shapes on CUDA, ~8 minutes on an H100
    bench/gpu/run.sh --device cpu --shape tiny        # the same script in seconds (CI runs it)
    bench/gpu/run.sh --only gen --shapes 1b --modes eager

Per shape (random weights, bf16 on CUDA): the engine's image generation at 1/16/64 images in
flight, eager and compiled; understanding at 1/32 sequences; on the reference shape (1B when it is
run) transformers' `generate` one request at a time for images and text, and a greedy check that
our batched tokens equal transformers'. The run is a list of sections; a dry estimate of each is
printed first, a section that would overrun `--budget` is skipped, and a section that raises prints
its traceback and leaves its rows marked failed while the rest carries on. The table (and its JSON
twin) is rewritten under `--out` / `$OUT` after every section, so a killed run still leaves figures.

Imports: janus_core, torch, transformers, numpy, PIL only (a GPU box has no server dependencies).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shlex
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from bench.gpu import measure, report
from bench.gpu.measure import Row
from bench.gpu.model import SHAPE_NAMES, build_random_model, parameter_count, resolve_shape, stock_copy
from bench.gpu.plan import Estimator, ShapeFacts, shape_facts
from bench.references import memcpy_bandwidth
from janus_core.models.device import resolve_device, resolve_dtype

SECTION_KINDS = ("gen", "und", "ref", "check")


class Skipped(Exception):
    """A section that cannot run here (not a failure): e.g. --compile without CUDA."""


@dataclass
class Section:
    name: str
    estimate_s: float
    planned: list[Row]  # the rows this section fills; shown with the reason when it fails or is skipped
    run: Callable[[], list[Row]]
    shape: str = ""
    first_s: float | None = None  # estimate of its first level: a section starts when that fits the budget
    after: Callable[[], None] | None = None  # e.g. drop a model no later section needs
    status: str = "pending"
    seconds: float = 0.0
    error: str = ""

    def summary(self) -> dict:
        return {"name": self.name, "status": self.status, "estimate_s": self.estimate_s, "seconds": self.seconds,
                "error": self.error}


@dataclass
class State:
    """What sections hand to later ones: the models of each shape, and the rows so far."""

    models: dict = field(default_factory=dict)  # shape -> LoadedModel (the engine's)
    refs: dict = field(default_factory=dict)  # shape -> LoadedModel (stock copy for the references)
    rows: dict = field(default_factory=dict)  # Row.key -> Row, in planned order
    deadline: float | None = None  # perf_counter() by which the budget runs out; None: no budget

    def left_s(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.perf_counter()

    def model(self, shape: str):
        if shape not in self.models:
            raise Skipped(f"no {shape} model (its setup failed or was skipped)")
        return self.models[shape]

    def resident_bytes(self, section: Section) -> int:
        """Bytes of weights held by models `section` does not use (they sit in every peak it measures)."""
        mine = self.refs.get(section.shape) if section.name.startswith("transformers") else \
            self.models.get(section.shape)
        held = [lm for lm in [*self.models.values(), *self.refs.values()] if lm is not mine]
        return sum(t.numel() * t.element_size() for lm in held
                   for t in [*lm.model.parameters(), *lm.model.buffers()])

    def ref(self, shape: str):
        if shape not in self.refs:
            raise Skipped(f"no {shape} reference model (its setup failed or was skipped)")
        return self.refs[shape]


def run_sections(sections: list[Section], state: State, budget_s: float,
                 on_progress: Callable[[Section], None] = lambda s: None) -> None:
    """Run each section in order, isolated: an exception marks its rows and the next one still runs."""
    started = time.perf_counter()
    state.deadline = started + budget_s if budget_s else None
    for section in sections:
        for row in section.planned:
            state.rows.setdefault(row.key, row)
        left = state.left_s()
        if (section.first_s or section.estimate_s) > left:
            section.status, section.error = "skipped", f"time budget: ~{section.estimate_s:.0f} s, {left:.0f} s left"
        else:
            t0 = time.perf_counter()
            try:
                others = state.resident_bytes(section)
                for row in section.run():
                    if row.peak_gib is not None:  # the peak of what this section uses: other models taken out
                        row.peak_gib -= others / 2**30
                    state.rows[row.key] = row
                section.status = "ok"
            except Skipped as exc:
                section.status, section.error = "skipped", str(exc)
            except Exception as exc:  # isolation: report it and carry on with the next section
                traceback.print_exc()
                section.status, section.error = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            section.seconds = time.perf_counter() - t0
        if section.after is not None:
            section.after()
        measure.free_device_memory()
        if section.status != "ok":
            for row in section.planned:
                if state.rows[row.key] is row:  # nothing measured for it
                    row.note = f"{section.status}: {section.error}"
        print(f"[{time.perf_counter() - started:6.1f} s] {section.name}: {section.status} in {section.seconds:.1f} s "
              f"(estimated {section.estimate_s:.1f} s){' - ' + section.error if section.error else ''}", flush=True)
        on_progress(section)


# --- sections ---------------------------------------------------------------------------------------


def level_rows(shape: str, section: str, mode: str, levels: list[int]) -> list[Row]:
    return [Row(shape, section, mode, c) for c in levels]


def fitting_levels(lm, kind: str, levels: list[int], rows_out: list[Row], shape: str, mode: str) -> list[int]:
    """The levels whose KV fits in free device memory (with room for activations); rows for the rest."""
    free = measure.free_bytes(lm.device)
    fits = []
    for c in levels:
        need = measure.kv_bytes_needed(lm, kind, c)
        if free is not None and need > 0.85 * free - 2 * 2**30:
            section = "generate" if kind == "generate" else "understand"
            rows_out.append(Row(shape, section, mode, c, note=f"skipped: needs {need / 2**30:.1f} GiB of KV, "
                                                               f"{free / 2**30:.1f} GiB free"))
        else:
            fits.append(c)
    return fits


def isolated_levels(state: State, shape: str, section: str, mode: str, levels: list[int],
                    one: Callable[[int], Row], estimate: Callable[[int], float]) -> list[Row]:
    """One row per level, each within the budget; a level that raises (e.g. out of memory) gets its error.

    After a failed level the others still run, except when compiling: a compile that failed at one
    batch size fails the same way at the next, slowly.
    """
    rows: list[Row] = []
    failed = ""
    for c in levels:
        if failed:
            rows.append(Row(shape, section, mode, c, note=f"skipped: {failed}"))
            continue
        if estimate(c) > state.left_s():
            rows.append(Row(shape, section, mode, c, note=f"skipped: time budget (~{estimate(c):.0f} s, "
                                                          f"{state.left_s():.0f} s left)"))
            continue
        try:
            rows.append(one(c))
        except Exception as exc:
            traceback.print_exc()
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            rows.append(Row(shape, section, mode, c, note=f"failed: {error}"))
            if mode != "eager":
                failed = f"{mode} failed at c={c}"
            measure.free_device_memory()
    return rows


def build_sections(args, device: torch.device, dtype: torch.dtype, bandwidth: float, state: State) -> list[Section]:
    est = Estimator(device.type, bandwidth)
    only = set(args.only)
    facts: dict[str, ShapeFacts] = {s: shape_facts(s, dtype) for s in args.shapes}
    n_new = args.max_new_tokens
    sections: list[Section] = []
    compile_sections: list[Section] = []

    for shape in args.shapes:
        f = facts[shape]
        is_ref = shape == args.ref_shape and bool(only & {"ref", "check"})

        def setup(shape=shape, is_ref=is_ref) -> list[Row]:
            lm = build_random_model(shape, device, dtype, seed=args.seed)
            state.models[shape] = lm
            if is_ref:  # before any engine sees the model: the references stay stock
                state.refs[shape] = stock_copy(lm)
            print(f"  {shape}: {parameter_count(lm) / 1e9:.2f}B parameters on {device} ({dtype})", flush=True)
            return []

        sections.append(Section(f"setup {shape}", est.setup(f, dtype.itemsize, 2 if is_ref else 1), [], setup))

        if "gen" in only:
            for mode in args.modes:
                planned = level_rows(shape, "generate", mode, args.levels)

                def gen(shape=shape, mode=mode, f=f) -> list[Row]:
                    if mode.startswith("compile") and device.type != "cuda":
                        raise Skipped("--compile needs CUDA (the runner runs eager elsewhere)")
                    lm = state.model(shape)
                    rows: list[Row] = []
                    levels = fitting_levels(lm, "generate", args.levels, rows, shape, mode)
                    if not levels:
                        return rows
                    engine = measure.make_engine(lm, "generate", max(levels), **measure.mode_config(mode))
                    timer = measure.StepTimer(engine)
                    rows += isolated_levels(state, shape, "generate", mode, levels,
                                            lambda c: measure.generation_level(lm, timer, c, mode, bandwidth),
                                            lambda c: est.generation(f, [c], mode))
                    return rows

                target = compile_sections if mode.startswith("compile") else sections
                target.append(Section(f"generate {mode} {shape}", est.generation(f, args.levels, mode), planned, gen,
                                      first_s=est.generation(f, args.levels[:1], mode)))

        if "und" in only:
            planned = level_rows(shape, "understand", "eager", args.und_levels)

            def und(shape=shape, f=f) -> list[Row]:
                lm = state.model(shape)
                rows: list[Row] = []
                levels = fitting_levels(lm, "understand", args.und_levels, rows, shape, "eager")
                if not levels:
                    return rows
                engine = measure.make_engine(lm, "understand", max(levels))
                timer = measure.StepTimer(engine)
                measure.warm_understanding(lm, timer)
                rows += isolated_levels(state, shape, "understand", "eager", levels,
                                        lambda c: measure.understanding_level(lm, engine, timer, c, n_new, bandwidth),
                                        lambda c: est.understanding(f, [c], n_new))
                return rows

            sections.append(Section(f"understand {shape}", est.understanding(f, args.und_levels, n_new), planned, und,
                                    first_s=est.understanding(f, args.und_levels[:1], n_new)))

        if is_ref and "ref" in only:
            sections.append(Section(
                f"transformers image {shape}", args.ref_requests * est.hf_image(f),
                [Row(shape, "transformers image", "eager", 1)],
                lambda shape=shape: [measure.reference_image_row(state.ref(shape), args.ref_requests, bandwidth)]))
            sections.append(Section(
                f"transformers text {shape}", (args.ref_requests + 1) * est.hf_text(f, n_new),
                [Row(shape, "transformers text", "eager", 1)],
                lambda shape=shape: [measure.reference_text_row(state.ref(shape), args.ref_requests, n_new,
                                                                bandwidth)]))

        if is_ref and "check" in only:
            sections.append(Section(
                f"greedy check understand {shape}", est.check_understanding(f, args.check_tokens),
                [Row(shape, "greedy check", "understand", len(measure.QUESTIONS))],
                lambda shape=shape: [measure.greedy_check_understanding(state.model(shape), state.ref(shape),
                                                                        args.check_tokens)]))
            sections.append(Section(
                f"greedy check generate {shape}", est.check_generation(f, measure.CHECK_IMAGES),
                [Row(shape, "greedy check", "generate", measure.CHECK_IMAGES)],
                lambda shape=shape: [measure.greedy_check_generation(state.model(shape), state.ref(shape))]))

    # Compiled runs go last: they cost the most (compilation) and are the likeliest to fail on an old torch,
    # so a tight budget or a failure there leaves every other figure in place.
    ordered = sections + compile_sections
    for section in ordered:
        section.shape = section.name.rsplit(" ", 1)[1]
    for shape in args.shapes:  # free each model once the last section that uses it is done
        mine = [s for s in ordered if s.shape == shape]
        mine[-1].after = lambda shape=shape: (state.models.pop(shape, None), state.refs.pop(shape, None))
        uses_ref = [s for s in mine if s.name.startswith(("transformers", "greedy check"))]
        if uses_ref and uses_ref[-1] is not mine[-1]:
            uses_ref[-1].after = lambda shape=shape: state.refs.pop(shape, None)
    return ordered


# --- command line -------------------------------------------------------------------------------------


def csv_ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def csv_choice(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return values

    return parse


def csv_shapes(text: str) -> list[str]:
    try:
        return [resolve_shape(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu/run.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cuda | cpu")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float32")
    p.add_argument("--shapes", "--shape", dest="shapes", type=csv_shapes, default=["1b", "7b"],
                   help=f"comma list of {', '.join(SHAPE_NAMES)} (default 1b,7b)")
    p.add_argument("--only", type=csv_choice(SECTION_KINDS), default=list(SECTION_KINDS),
                   help="comma list of gen, und, ref, check (default all)")
    p.add_argument("--modes", type=csv_choice(measure.MODES), default=["eager", "graphs", "compile"],
                   help="generation decode modes: eager, graphs (the static step as CUDA graphs), compile, "
                        "compile-graphs (default eager,graphs,compile)")
    p.add_argument("--levels", type=csv_ints, default=[1, 16, 64], help="images in flight (default 1,16,64)")
    p.add_argument("--und-levels", type=csv_ints, default=[1, 32], help="understanding sequences (default 1,32)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="understanding tokens per request (default 128)")
    p.add_argument("--check-tokens", type=int, default=32, help="tokens per request in the greedy check")
    p.add_argument("--ref-requests", type=int, default=2,
                   help="transformers requests per reference; the first warms up when there are two or more")
    p.add_argument("--ref-shape", type=csv_shapes, default=None,
                   help="shape for the references and the greedy check (default 1b when run, else the first)")
    p.add_argument("--budget", type=float, default=450.0,
                   help="seconds; a section whose estimate exceeds what is left is skipped (0: no limit)")
    p.add_argument("--out", default=os.environ.get("OUT") or None, help="write gpu.md and gpu.json here ($OUT)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.ref_shape = args.ref_shape[0] if args.ref_shape else ("1b" if "1b" in args.shapes else args.shapes[0])
    return args


def quiet_libraries() -> None:
    """No progress bars or advisory warnings from the libraries in the table's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
    return f"cpu ({torch.get_num_threads()} torch threads)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    started = time.perf_counter()
    bandwidth = memcpy_bandwidth(device, nbytes=(1024 if device.type == "cuda" else 64) * 2**20)
    meta = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device_name(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "dtype": str(dtype).removeprefix("torch."), "bandwidth_gbs": bandwidth / 1e9,
            "command": "bench/gpu/run.sh " + shlex.join(sys.argv[1:] if argv is None else argv),
            "budget_s": args.budget or "none", "estimate_s": 0.0, "elapsed_s": 0.0}
    print(f"# janus-server GPU check: {meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, "
          f"{meta['dtype']}, copy bandwidth {meta['bandwidth_gbs']:.1f} GB/s", flush=True)
    state = State()
    sections = build_sections(args, device, dtype, bandwidth, state)
    meta["estimate_s"] = sum(s.estimate_s for s in sections)
    print("\n## dry estimate (seconds; the constants are guesses, the report prints actuals beside them)")
    for s in sections:
        print(f"  {s.estimate_s:8.1f}  {s.name}")
    print(f"  {meta['estimate_s']:8.1f}  total (budget {meta['budget_s']})\n", flush=True)
    out = Path(args.out) if args.out else None

    def progress(_: Section) -> None:
        meta["elapsed_s"] = time.perf_counter() - started
        rows = list(state.rows.values())
        report.fill_ratios(rows)
        if out is not None:
            report.write(out, meta, rows, [s.summary() for s in sections])

    run_sections(sections, state, args.budget, progress)
    progress(sections[-1])
    print()
    print(report.markdown(meta, list(state.rows.values()), [s.summary() for s in sections]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
