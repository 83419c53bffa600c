"""Draw the bundled example concept: a small red toy robot on five different backgrounds, and as cut-outs.

The images in example_images/perres_example/ (the robot in five scenes) and example_images/perres_cutout/
(RGBA cut-outs: the robot on a transparent background, for training with subject masks) are made by this
script (CC0, see example_images/LICENSE.txt).
They are synthetic on purpose: no photos, no third-party rights, and small enough to ship with the pack.
Run from the repository root:

    python tools/make_example_images.py

The output is deterministic (fixed seeds), so re-running reproduces the same files.
"""
from __future__ import annotations

import os
import random

from PIL import Image, ImageDraw, ImageFilter

IMAGES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_images")
OUT_DIR = os.path.join(IMAGES_DIR, "perres_example")
CUTOUT_DIR = os.path.join(IMAGES_DIR, "perres_cutout")

RED, DARK_RED = (214, 38, 42), (150, 20, 26)
GREY, DARK_GREY = (170, 174, 182), (92, 96, 104)
YELLOW, WHITE, BLACK = (250, 204, 40), (248, 248, 248), (24, 24, 28)


def vertical_gradient(size, top, bottom) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for y in range(height):
        t = y / max(1, height - 1)
        draw.line([(0, y), (width, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    return image


def background_meadow(size, rng) -> Image.Image:
    image = vertical_gradient(size, (120, 180, 240), (200, 228, 250))
    draw = ImageDraw.Draw(image)
    width, height = size
    horizon = int(height * 0.62)
    draw.rectangle([0, horizon, width, height], fill=(86, 160, 70))
    for _ in range(120):  # grass blades
        x, y = rng.randrange(width), rng.randrange(horizon, height)
        draw.line([(x, y), (x + rng.randint(-2, 2), y - rng.randint(3, 8))], fill=(60, 130, 50), width=1)
    draw.ellipse([width * 0.7, height * 0.08, width * 0.7 + 34, height * 0.08 + 34], fill=(255, 236, 150))
    return image


def background_table(size, rng) -> Image.Image:
    width, height = size
    image = vertical_gradient(size, (236, 226, 208), (220, 206, 186))
    draw = ImageDraw.Draw(image)
    top = int(height * 0.58)
    draw.rectangle([0, top, width, height], fill=(150, 98, 56))
    for y in range(top + 4, height, 9):  # wood grain
        offset = rng.randint(-3, 3)
        draw.line([(0, y + offset), (width, y - offset)], fill=(128, 82, 44), width=2)
    return image


def background_studio(size, rng) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, (200, 200, 204))
    vignette = Image.new("L", size, 0)
    ImageDraw.Draw(vignette).ellipse([-width * 0.2, -height * 0.1, width * 1.2, height * 1.15], fill=255)
    vignette = vignette.filter(ImageFilter.GaussianBlur(radius=min(size) // 6))
    dark = Image.new("RGB", size, (110, 112, 120))
    return Image.composite(image, dark, vignette)


def background_room(size, rng) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, (232, 218, 186))
    draw = ImageDraw.Draw(image)
    draw.rectangle([width * 0.08, height * 0.08, width * 0.42, height * 0.46], fill=(255, 255, 255))
    draw.rectangle([width * 0.1, height * 0.1, width * 0.4, height * 0.44], fill=(150, 200, 235))
    draw.line([(width * 0.25, height * 0.1), (width * 0.25, height * 0.44)], fill=(255, 255, 255), width=3)
    floor = int(height * 0.7)
    draw.rectangle([0, floor, width, height], fill=(120, 90, 120))
    for x in range(0, width, 24):
        draw.line([(x, floor), (x - 30, height)], fill=(104, 76, 104), width=1)
    return image


def background_night(size, rng) -> Image.Image:
    width, height = size
    image = vertical_gradient(size, (16, 24, 64), (48, 60, 120))
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x, y = rng.randrange(width), rng.randrange(int(height * 0.7))
        r = rng.choice((1, 1, 1, 2))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 220))
    draw.rectangle([0, int(height * 0.75), width, height], fill=(40, 44, 60))
    return image


def draw_robot(scale: float) -> Image.Image:
    """The concept on a transparent layer: red body and head, yellow antenna ball and chest button."""
    unit = scale
    width, height = int(120 * unit), int(190 * unit)
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)

    def box(x0, y0, x1, y1):
        return [x0 * unit, y0 * unit, x1 * unit, y1 * unit]

    # antenna
    d.line([(60 * unit, 8 * unit), (60 * unit, 30 * unit)], fill=DARK_GREY, width=max(2, int(4 * unit)))
    d.ellipse(box(52, 0, 68, 16), fill=YELLOW, outline=DARK_GREY)
    # head
    d.rounded_rectangle(box(28, 28, 92, 76), radius=10 * unit, fill=RED, outline=DARK_RED, width=max(1, int(3 * unit)))
    for cx in (46, 74):  # eyes
        d.ellipse(box(cx - 9, 42, cx + 9, 60), fill=WHITE)
        d.ellipse(box(cx - 4, 47, cx + 4, 55), fill=BLACK)
    d.rectangle(box(48, 66, 72, 69), fill=DARK_RED)  # mouth
    # neck, body
    d.rectangle(box(52, 76, 68, 84), fill=DARK_GREY)
    d.rounded_rectangle(box(22, 84, 98, 146), radius=8 * unit, fill=RED, outline=DARK_RED, width=max(1, int(3 * unit)))
    d.ellipse(box(50, 100, 70, 120), fill=YELLOW, outline=DARK_RED)
    # arms
    d.rounded_rectangle(box(4, 88, 20, 134), radius=6 * unit, fill=GREY, outline=DARK_GREY)
    d.rounded_rectangle(box(100, 88, 116, 134), radius=6 * unit, fill=GREY, outline=DARK_GREY)
    d.ellipse(box(3, 130, 21, 146), fill=DARK_GREY)
    d.ellipse(box(99, 130, 117, 146), fill=DARK_GREY)
    # legs, feet
    d.rectangle(box(34, 146, 52, 176), fill=GREY, outline=DARK_GREY)
    d.rectangle(box(68, 146, 86, 176), fill=GREY, outline=DARK_GREY)
    d.rounded_rectangle(box(28, 174, 56, 188), radius=4 * unit, fill=DARK_GREY)
    d.rounded_rectangle(box(64, 174, 92, 188), radius=4 * unit, fill=DARK_GREY)
    return layer


def compose(background: Image.Image, rng: random.Random, height_share: float, centre_x: float, ground: float,
            angle: float) -> Image.Image:
    width, height = background.size
    robot = draw_robot(scale=height * height_share / 190)
    robot = robot.rotate(angle, resample=Image.BICUBIC, expand=True)
    x = int(width * centre_x - robot.width / 2)
    y = int(height * ground - robot.height)
    shadow = Image.new("L", background.size, 0)
    ImageDraw.Draw(shadow).ellipse([x + robot.width * 0.1, y + robot.height - 8, x + robot.width * 0.9,
                                    y + robot.height + 8], fill=110)
    shadow = shadow.filter(ImageFilter.GaussianBlur(4))
    image = Image.composite(Image.new("RGB", background.size, (30, 30, 30)), background, shadow)
    image.paste(robot, (x, y), robot)
    return image


SCENES = [
    # name, size (w, h), background, robot height share, centre x, ground line, rotation (deg)
    ("01_meadow", (320, 320), background_meadow, 0.62, 0.45, 0.9, 0.0),
    ("02_table", (320, 256), background_table, 0.66, 0.58, 0.88, -6.0),
    ("03_studio", (256, 320), background_studio, 0.55, 0.5, 0.86, 4.0),
    ("04_room", (288, 288), background_room, 0.5, 0.66, 0.93, 0.0),
    ("05_night", (320, 288), background_night, 0.6, 0.4, 0.92, 8.0),
]


CUTOUTS = [
    # name, size (w, h), robot height share, centre x, rotation (deg)
    ("01_upright", (256, 256), 0.8, 0.5, 0.0),
    ("02_lean_left", (288, 256), 0.72, 0.45, 10.0),
    ("03_small", (256, 288), 0.55, 0.55, -4.0),
    ("04_lean_right", (256, 256), 0.76, 0.52, -12.0),
    ("05_wide", (320, 256), 0.7, 0.4, 5.0),
]


def cutout(size, share: float, centre_x: float, angle: float) -> Image.Image:
    """The robot alone on a fully transparent canvas: its alpha is the subject mask."""
    width, height = size
    robot = draw_robot(scale=height * share / 190).rotate(angle, resample=Image.BICUBIC, expand=True)
    canvas = Image.new("RGBA", size, (0, 0, 0, 0))
    canvas.alpha_composite(robot, (int(width * centre_x - robot.width / 2), (height - robot.height) // 2))
    return canvas


def main() -> None:
    os.makedirs(OUT_DIR, exist_ok=True)
    for index, (name, size, background, share, centre_x, ground, angle) in enumerate(SCENES):
        rng = random.Random(1000 + index)
        image = compose(background(size, rng), rng, share, centre_x, ground, angle)
        image.save(os.path.join(OUT_DIR, f"{name}.png"), optimize=True)
    os.makedirs(CUTOUT_DIR, exist_ok=True)
    for name, size, share, centre_x, angle in CUTOUTS:
        cutout(size, share, centre_x, angle).save(os.path.join(CUTOUT_DIR, f"{name}.png"), optimize=True)


if __name__ == "__main__":
    main()
