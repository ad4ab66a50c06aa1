"""Draw benchmark.png with Pillow only (matplotlib is not installed in the venv).

Three panels: resident memory per context and mode, start-up time per context and mode, and
the segmented/static throughput ratios with the 0.99 target line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

W, H = 1500, 620
BG = (255, 255, 255)
FG = (30, 30, 30)
GRID = (225, 225, 225)
COLORS = {"static": (70, 110, 190), "segmented": (235, 140, 40)}
FAIL = (200, 40, 40)
RATIO_COLORS = {"prefill": (90, 160, 90), "decode": (150, 90, 170)}


def _font(size: int, bold: bool = False) -> ImageFont.ImageFont:
    names = ["DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"]
    for name in names:
        for folder in ("/usr/share/fonts/truetype/dejavu", ""):
            try:
                return ImageFont.truetype(str(Path(folder) / name) if folder else name, size)
            except OSError:
                continue
    return ImageFont.load_default(size)


def _ctx(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def _nice_max(v: float) -> tuple[float, float]:
    """An axis maximum >= v and a tick step."""
    if v <= 0:
        return 1.0, 0.2
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if m * exp >= v:
            top = m * exp
            break
    step = top / 5
    return top, step


def _text(
    d: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    s: str,
    font: Any,
    anchor: str = "la",
    fill: tuple[int, int, int] = FG,
) -> None:
    d.text(xy, s, font=font, fill=fill, anchor=anchor)


def _axes(
    d: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    top: float,
    step: float,
    fmt: str,
    font: Any,
    ylabel: str,
    lo: float = 0.0,
) -> Any:
    x0, y0, x1, y1 = box
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill=FG, width=2)

    def ypix(v: float) -> float:
        return y1 - (v - lo) / (top - lo) * (y1 - y0)

    v = lo
    while v <= top + 1e-9:
        y = ypix(v)
        d.line([(x0 + 1, y), (x1, y)], fill=GRID, width=1)
        d.line([(x0 - 5, y), (x0, y)], fill=FG, width=2)
        _text(d, (x0 - 8, y), fmt.format(v), font, anchor="rm")
        v += step
    _text(d, (x0, y0 - 14), ylabel, font, anchor="ls")
    return ypix


def _grouped_bars(
    d: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    startup: list[dict],
    value: Any,
    top: float,
    step: float,
    fmt: str,
    label_fmt: str,
    fonts: dict,
    ylabel: str,
) -> None:
    x0, y0, x1, y1 = box
    ypix = _axes(d, box, top, step, fmt, fonts["small"], ylabel)
    contexts = sorted({r["context"] for r in startup})
    group_w = (x1 - x0) / len(contexts)
    bar_w = group_w * 0.32
    for i, ctx in enumerate(contexts):
        gx = x0 + group_w * i + group_w / 2
        for j, mode in enumerate(("static", "segmented")):
            rec = next((r for r in startup if r["context"] == ctx and r["mode"] == mode), None)
            bx = gx + (j - 1) * bar_w - 2 + j * 4
            if rec is None:
                continue
            if rec["started"]:
                v = value(rec)
                yt = ypix(min(v, top))
                d.rectangle([bx, yt, bx + bar_w, y1 - 1], fill=COLORS[mode])
                _text(d, (bx + bar_w / 2, yt - 4), label_fmt.format(v), fonts["small"], anchor="md")
            else:
                # A hatched stub and the word "failed" where the bar would be.
                d.rectangle([bx, y1 - 60, bx + bar_w, y1 - 1], outline=FAIL, width=2)
                d.line([(bx, y1 - 60), (bx + bar_w, y1 - 1)], fill=FAIL, width=2)
                d.line([(bx + bar_w, y1 - 60), (bx, y1 - 1)], fill=FAIL, width=2)
                _text(
                    d,
                    (bx + bar_w / 2, y1 - 66),
                    "failed",
                    fonts["small_bold"],
                    anchor="md",
                    fill=FAIL,
                )
        _text(d, (gx, y1 + 8), _ctx(ctx), fonts["label"], anchor="ma")
    _text(d, ((x0 + x1) / 2, y1 + 34), "context length (tokens)", fonts["small"], anchor="ma")


def render_png(data: dict[str, Any], path: Path) -> None:
    img = Image.new("RGB", (W, H), BG)
    d = ImageDraw.Draw(img)
    fonts = {
        "title": _font(22, bold=True),
        "panel": _font(17, bold=True),
        "label": _font(15),
        "small": _font(13),
        "small_bold": _font(13, bold=True),
    }
    m = data["machine"]
    _text(
        d,
        (20, 14),
        "--kv-alloc-mode static vs segmented, tiny Llama (float32) on SGLang's CPU engine - "
        "no GPU used",
        fonts["title"],
    )
    _text(
        d,
        (20, 44),
        f"{m['logical_cpus']} cores, {m['memory_total_bytes'] / 2**30:.0f} GB RAM; "
        f"--max-total-tokens {data['settings']['max_total_tokens']} in every server; "
        f"{data['started_at']}",
        fonts["small"],
    )
    # Legend.
    lx = W - 330
    for k, mode in enumerate(("static", "segmented")):
        d.rectangle([lx + k * 150, 46, lx + k * 150 + 18, 62], fill=COLORS[mode])
        _text(d, (lx + k * 150 + 24, 54), mode, fonts["label"], anchor="lm")

    startup = data["startup"]
    # Panel 1: RSS.
    p1 = (95, 130, 560, 540)
    _text(d, (p1[0] - 70, 86), "Resident memory after start-up (GB, all processes)", fonts["panel"])
    rss_max = max((r["rss_bytes"] for r in startup if r["started"]), default=1) / 1e9
    top, step = _nice_max(rss_max * 1.1)
    _grouped_bars(
        d, p1, startup, lambda r: r["rss_bytes"] / 1e9, top, step, "{:.0f}", "{:.1f}", fonts, "GB"
    )

    # Panel 2: start-up time.
    p2 = (680, 130, 1010, 540)
    _text(d, (p2[0] - 60, 86), "Start-up time (s, launch to /health)", fonts["panel"])
    st_max = max((r["startup_s"] for r in startup if r["started"]), default=1)
    top, step = _nice_max(st_max * 1.1)
    _grouped_bars(
        d, p2, startup, lambda r: r["startup_s"], top, step, "{:.0f}", "{:.0f}", fonts, "s"
    )

    # Panel 3: throughput ratios.
    p3 = (1140, 130, 1470, 540)
    _text(d, (p3[0] - 60, 86), "Throughput, segmented / static", fonts["panel"])
    tps = [t for t in data["throughput"] if "ratio_segmented_over_static" in t]
    ratios = [t["ratio_segmented_over_static"][ph] for t in tps for ph in ("prefill", "decode")]
    lo = min([0.9] + [math.floor(r * 50) / 50 for r in ratios])
    hi = max([1.05] + [math.ceil(r * 50) / 50 for r in ratios])
    step = 0.05 if hi - lo <= 0.3 else 0.1
    lo = math.floor(lo / step + 1e-9) * step
    hi = math.ceil(hi / step - 1e-9) * step
    ypix = _axes(d, p3, hi, step, "{:.2f}", fonts["small"], "ratio", lo=lo)
    x0, y0, x1, y1 = p3
    for val, color, label in ((1.0, FG, "1.00"), (0.99, FAIL, "target 0.99")):
        y = ypix(val)
        for xs in range(int(x0), int(x1), 12):
            d.line([(xs, y), (min(xs + 7, x1), y)], fill=color, width=2)
        if val != 1.0:
            _text(d, (x1 - 2, y + 4), label, fonts["small"], anchor="ra", fill=color)
    if tps:
        group_w = (x1 - x0) / len(tps)
        bar_w = group_w * 0.3
        for i, t in enumerate(tps):
            gx = x0 + group_w * i + group_w / 2
            for j, ph in enumerate(("prefill", "decode")):
                v = t["ratio_segmented_over_static"][ph]
                bx = gx + (j - 1) * bar_w - 2 + j * 4
                yv = ypix(max(min(v, hi), lo))
                ybase = ypix(max(lo, min(1.0, hi)))
                d.rectangle([bx, min(yv, ybase), bx + bar_w, max(yv, ybase)], fill=RATIO_COLORS[ph])
                _text(
                    d, (bx + bar_w / 2, min(yv, ybase) - 4), f"{v:.3f}", fonts["small"], anchor="md"
                )
            _text(d, (gx, y1 + 8), f"context {_ctx(t['context'])}", fonts["label"], anchor="ma")
    for k, ph in enumerate(("prefill", "decode")):
        bx = x0 + 10 + k * 110
        d.rectangle([bx, y1 + 36, bx + 16, y1 + 50], fill=RATIO_COLORS[ph])
        _text(d, (bx + 22, y1 + 43), ph, fonts["small"], anchor="lm")
    skipped = [t for t in data["throughput"] if "skipped" in t]
    if skipped:
        _text(
            d,
            (x0, y1 + 62),
            "skipped: " + ", ".join(_ctx(t["context"]) for t in skipped),
            fonts["small"],
        )
    _text(
        d,
        (20, H - 18),
        "bars marked 'failed': the server exited during start-up (see benchmark.md for the "
        "exit code and error line).",
        fonts["small"],
        anchor="ls",
    )
    img.save(path)
