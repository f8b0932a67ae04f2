"""Line plots as PNG files with numpy and zlib only (no matplotlib on the benchmark machine).

`line_panels(path, panels)` draws stacked panels, each a list of `(x, y, color)` curves on
its own y-range, in a thin frame, and writes a deterministic PNG (no timestamps, no
metadata chunks): the same data give the same bytes. There is no text; the page that
shows the figure gives the legend.
"""

import struct
import zlib

import numpy as np

COLORS = {
    "black": (0, 0, 0),
    "grey": (150, 150, 150),
    "blue": (31, 119, 180),
    "orange": (255, 127, 14),
    "green": (44, 160, 44),
    "red": (214, 39, 40),
    "purple": (148, 103, 189),
}


def _chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def write_png(path, image):
    """Writes an (h, w, 3) uint8 array as an 8-bit RGB PNG."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(h))
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 9))
        + _chunk(b"IEND", b"")
    )
    with open(path, "wb") as f:
        f.write(data)


def _draw_line(image, x0, y0, x1, y1, color, thickness):
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.rint(np.linspace(x0, x1, n)).astype(int)
    ys = np.rint(np.linspace(y0, y1, n)).astype(int)
    h, w, _ = image.shape
    r = thickness // 2
    for dx in range(-r, thickness - r):
        for dy in range(-r, thickness - r):
            xx, yy = np.clip(xs + dx, 0, w - 1), np.clip(ys + dy, 0, h - 1)
            image[yy, xx] = color


def line_panels(path, panels, width=900, panel_height=160, margin=12, thickness=2):
    """Stacked panels of curves. `panels`: a list of lists of `(x, y, color)`; x shared
    range per panel from the data, y-range from the data with 5% padding."""
    height = len(panels) * panel_height + (len(panels) + 1) * margin
    image = np.full((height, width + 2 * margin, 3), 255, np.uint8)
    for i, curves in enumerate(panels):
        top = margin + i * (panel_height + margin)
        left, right, bottom = margin, margin + width - 1, top + panel_height - 1
        xs = np.concatenate([np.asarray(c[0], float) for c in curves])
        ys = np.concatenate([np.asarray(c[1], float) for c in curves])
        x_lo, x_hi = float(xs.min()), float(xs.max())
        y_lo, y_hi = float(ys.min()), float(ys.max())
        pad = 0.05 * (y_hi - y_lo or 1.0)
        y_lo, y_hi = y_lo - pad, y_hi + pad
        frame = COLORS["grey"]
        for a, b, c, d in (
            (left, top, right, top),
            (left, bottom, right, bottom),
            (left, top, left, bottom),
            (right, top, right, bottom),
        ):
            _draw_line(image, a, b, c, d, frame, 1)
        for x, y, color in curves:
            px = left + (np.asarray(x, float) - x_lo) / (x_hi - x_lo or 1.0) * (right - left)
            py = bottom - (np.asarray(y, float) - y_lo) / (y_hi - y_lo) * (bottom - top)
            rgb = COLORS.get(color, color)
            for j in range(len(px) - 1):
                _draw_line(image, px[j], py[j], px[j + 1], py[j + 1], rgb, thickness)
    write_png(path, image)
    return image.shape
