"""The app's icons: a white "Q" ring on the accent colour, drawn with shapes (no font needed).

- ``icon-{32,192,512}.png`` (purpose ``any``): a rounded square on a transparent background;
- ``maskable-512.png`` (purpose ``maskable``): full bleed, the glyph inside the central 80 %
  circle that every mask keeps (https://w3c.github.io/manifest/#icon-masks);
- ``apple-touch-icon.png`` (180 px, opaque: iOS fills transparency with black).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parents[1] / "control_plane" / "pages" / "static" / "icons"
ACCENT = (58, 79, 216, 255)  # --accent in site.css
WHITE = (255, 255, 255, 255)
SUPERSAMPLE = 4


def _glyph(draw: ImageDraw.ImageDraw, size: int, scale: float) -> None:
    """A "Q": a ring and a tail, ``scale`` the ring's outer diameter over ``size``."""
    centre = size / 2
    radius = size * scale / 2
    width = max(1, round(radius * 0.32))
    box = (centre - radius, centre - radius, centre + radius, centre + radius)
    draw.ellipse(box, outline=WHITE, width=width)
    tail_from = (centre + radius * 0.25, centre + radius * 0.25)
    tail_to = (centre + radius * 1.05, centre + radius * 1.05)
    draw.line([tail_from, tail_to], fill=WHITE, width=width)


def _render(size: int, *, rounded: bool, scale: float, opaque: bool = False) -> Image.Image:
    big = size * SUPERSAMPLE
    background = (0, 0, 0, 0) if not opaque else ACCENT
    image = Image.new("RGBA", (big, big), background)
    draw = ImageDraw.Draw(image)
    if rounded:
        draw.rounded_rectangle((0, 0, big - 1, big - 1), radius=round(big * 0.22), fill=ACCENT)
    else:
        draw.rectangle((0, 0, big, big), fill=ACCENT)
    _glyph(draw, big, scale)
    small = image.resize((size, size), Image.Resampling.LANCZOS)
    return small.convert("RGB") if opaque else small


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for size in (32, 192, 512):
        _render(size, rounded=True, scale=0.5).save(OUT / f"icon-{size}.png", optimize=True)
    # The glyph (with its tail) stays well inside the 40 %-radius safe circle.
    _render(512, rounded=False, scale=0.4).save(OUT / "maskable-512.png", optimize=True)
    _render(180, rounded=False, scale=0.5, opaque=True).save(
        OUT / "apple-touch-icon.png", optimize=True
    )
    for path in sorted(OUT.glob("*.png")):
        print(path.relative_to(OUT.parents[3]), path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
