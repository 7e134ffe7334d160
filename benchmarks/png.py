"""A tiny dependency-free plotter: RGB canvas, 5×7 bitmap font, log-log line plots, PNG via zlib/struct."""
from __future__ import annotations

import math
import struct
import zlib

# 5×7 font, ASCII 32..126: 5 column bytes per glyph, bit 0 = top row.
_FONT_HEX = (
    "0000000000" "00005f0000" "0007000700" "147f147f14" "242a7f2a12" "2313086462" "3649552250" "0005030000"
    "001c224100" "0041221c00" "14083e0814" "08083e0808" "0050300000" "0808080808" "0060600000" "2010080402"
    "3e5149453e" "00427f4000" "4261514946" "2141454b31" "1814127f10" "2745454539" "3c4a494930" "0171090503"
    "3649494936" "064949291e" "0036360000" "0056360000" "0814224100" "1414141414" "0041221408" "0201510906"
    "324979413e" "7e1111117e" "7f49494936" "3e41414122" "7f4141221c" "7f49494941" "7f09090901" "3e4149497a"
    "7f0808087f" "00417f4100" "2040413f01" "7f08142241" "7f40404040" "7f020c027f" "7f0408107f" "3e4141413e"
    "7f09090906" "3e4151215e" "7f09192946" "4649494931" "01017f0101" "3f4040403f" "1f2040201f" "3f4038403f"
    "6314081463" "0708700807" "6151494543" "007f414100" "0204081020" "0041417f00" "0402010204" "4040404040"
    "0001020400" "2054545478" "7f48444438" "3844444420" "384444487f" "3854545418" "087e090102" "0c5252523e"
    "7f08040478" "00447d4000" "2040443d00" "7f10284400" "00417f4000" "7c04180478" "7c08040478" "3844444438"
    "7c14141408" "081414187c" "7c08040408" "4854545420" "043f444020" "3c4040207c" "1c2040201c" "3c4030403c"
    "4428102844" "0c5050503c" "4464544c44" "0008364100" "00007f0000" "0041360800" "0804081008"
)
_FONT = bytes.fromhex(_FONT_HEX)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
BLACK, GREY, LIGHT, WHITE = (0, 0, 0), (110, 110, 110), (225, 225, 225), (255, 255, 255)


def encode_png(width: int, height: int, rgb: bytes) -> bytes:
    """8-bit RGB PNG of `rgb` (row-major, 3 bytes per pixel)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    stride = 3 * width
    raw = b"".join(b"\x00" + bytes(rgb[y * stride:(y + 1) * stride]) for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


class Canvas:
    def __init__(self, width: int, height: int, bg=WHITE):
        self.w, self.h = width, height
        self.buf = bytearray(bytes(bg) * (width * height))

    def set(self, x: int, y: int, c) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            self.buf[i:i + 3] = bytes(c)

    def rect(self, x0: int, y0: int, x1: int, y1: int, c) -> None:
        """Filled, inclusive corners, clipped."""
        x0, x1 = max(0, min(x0, x1)), min(self.w - 1, max(x0, x1))
        row = bytes(c) * (x1 - x0 + 1)
        for y in range(max(0, min(y0, y1)), min(self.h - 1, max(y0, y1)) + 1):
            i = 3 * (y * self.w + x0)
            self.buf[i:i + len(row)] = row

    def line(self, x0: int, y0: int, x1: int, y1: int, c, width: int = 1) -> None:
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err, lo = dx + dy, -(width // 2)
        while True:
            self.rect(x0 + lo, y0 + lo, x0 + lo + width - 1, y0 + lo + width - 1, c)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def text(self, x: int, y: int, s: str, c=BLACK, scale: int = 1, vertical: bool = False) -> None:
        """Top-left at (x, y); vertical text reads bottom to top with (x, y) its bottom-left."""
        for n, ch in enumerate(s):
            k = ord(ch) - 32 if 32 <= ord(ch) < 127 else ord("?") - 32
            for col in range(5):
                bits = _FONT[5 * k + col]
                for row in range(7):
                    if bits >> row & 1:
                        u, v = (6 * n + col) * scale, row * scale
                        px, py = (x + v, y - u - scale + 1) if vertical else (x + u, y + v)
                        self.rect(px, py, px + scale - 1, py + scale - 1, c)

    def png(self) -> bytes:
        return encode_png(self.w, self.h, self.buf)


def text_width(s: str, scale: int = 1) -> int:
    return 6 * scale * len(s) - scale


def log_ticks(lo: float, hi: float, base2: bool = False) -> list[float]:
    """Tick values inside [lo, hi]: decades, else 1-2-5 (or powers of two when base2)."""
    e0, e1 = math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1
    if base2:
        p2 = [2.0**e for e in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi)) + 1) if lo <= 2.0**e <= hi]
        if 2 <= len(p2) <= 10:
            return p2
    for mults in ((1,), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        t = [m * 10.0**e for e in range(e0, e1 + 1) for m in mults if lo <= m * 10.0**e <= hi]
        if len(t) >= 3 or (len(t) >= 2 and mults != (1,)):
            return t
    return [lo, hi]


def fmt_tick(v: float) -> str:
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        m, e = f"{v:.0e}".split("e")
        return f"{m}e{int(e)}"
    return str(int(v)) if v == int(v) else f"{v:.3g}"


def _range(vals: list[float]) -> tuple[float, float]:
    lo, hi = math.log10(min(vals)), math.log10(max(vals))
    pad = max(0.05 * (hi - lo), 0.15 if hi == lo else 0.0)
    return 10 ** (lo - pad), 10 ** (hi + pad)


def _panel(cv: Canvas, x0: int, y0: int, w: int, h: int, p: dict, colors: dict) -> None:
    left, right, top, bottom = 62, 12, 22, 34
    ax0, ay0, ax1, ay1 = x0 + left, y0 + top, x0 + w - right, y0 + h - bottom
    cv.text(x0 + (w - text_width(p.get("title", ""), 2)) // 2, y0 + 2, p.get("title", ""), BLACK, 2)
    pts = [(x, y) for s in p["series"].values() for x, y in s if x and y and x > 0 and y > 0]
    if not pts:
        cv.text(ax0 + 10, (ay0 + ay1) // 2, "no data", GREY, 2)
        return
    xlo, xhi = _range([x for x, _ in pts])
    ylo, yhi = _range([y for _, y in pts])

    def px(x):
        return round(ax0 + (math.log10(x) - math.log10(xlo)) / (math.log10(xhi) - math.log10(xlo)) * (ax1 - ax0))

    def py(y):
        return round(ay1 - (math.log10(y) - math.log10(ylo)) / (math.log10(yhi) - math.log10(ylo)) * (ay1 - ay0))

    for t in log_ticks(xlo, xhi, base2=True):
        cv.line(px(t), ay0, px(t), ay1, LIGHT)
        cv.line(px(t), ay1, px(t), ay1 + 4, BLACK)
        lab = fmt_tick(t)
        cv.text(px(t) - text_width(lab) // 2, ay1 + 7, lab, BLACK)
    for t in log_ticks(ylo, yhi):
        cv.line(ax0, py(t), ax1, py(t), LIGHT)
        cv.line(ax0 - 4, py(t), ax0, py(t), BLACK)
        lab = fmt_tick(t)
        cv.text(ax0 - 7 - text_width(lab), py(t) - 3, lab, BLACK)
    cv.line(ax0, ay0, ax0, ay1, BLACK)
    cv.line(ax0, ay1, ax1, ay1, BLACK)
    xl = p.get("xlabel", "")
    cv.text((ax0 + ax1 - text_width(xl)) // 2, ay1 + 20, xl, BLACK)
    yl = p.get("ylabel", "")
    cv.text(x0 + 4, (ay0 + ay1 + text_width(yl)) // 2, yl, BLACK, vertical=True)
    for name, s in p["series"].items():
        s = sorted((x, y) for x, y in s if x and y and x > 0 and y > 0)
        c = colors[name]
        for (xa, ya), (xb, yb) in zip(s, s[1:]):
            cv.line(px(xa), py(ya), px(xb), py(yb), c, 2)
        for x, y in s:
            cv.rect(px(x) - 2, py(y) - 2, px(x) + 2, py(y) + 2, c)


def plot_loglog(panels: list[dict], title: str = "", panel_w: int = 480, panel_h: int = 360) -> Canvas:
    """Side-by-side log-log panels, each {"title", "xlabel", "ylabel", "series": {name: [(x, y), ...]}};
    one legend (a colour per series name, shared by the panels) below them."""
    names: list[str] = []
    for p in panels:
        names += [n for n in p["series"] if n not in names]
    colors = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    W = panel_w * max(1, len(panels))
    per_row = max(1, W // 200)
    head = 30 if title else 4
    cv = Canvas(W, head + panel_h + 18 * ((len(names) + per_row - 1) // per_row) + 8)
    if title:
        cv.text((W - text_width(title, 2)) // 2, 4, title, BLACK, 2)
    for i, p in enumerate(panels):
        _panel(cv, i * panel_w, head, panel_w, panel_h, p, colors)
    for i, n in enumerate(names):
        lx, ly = 62 + (i % per_row) * 200, head + panel_h + 4 + 18 * (i // per_row)
        cv.rect(lx, ly + 2, lx + 16, ly + 5, colors[n])
        cv.text(lx + 22, ly, n[:29], BLACK)
    return cv


def save_plot(path: str, panels: list[dict], title: str = "", **kw) -> tuple[int, int]:
    cv = plot_loglog(panels, title, **kw)
    with open(path, "wb") as f:
        f.write(cv.png())
    return cv.w, cv.h
