"""A PNG chart of a bench record: one stacked bar per engine and configuration (text encoder, U-Net steps, VAE
decode, the rest), drawn with Pillow so that the harness needs no plotting library."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = {"text": (86, 180, 233), "unet": (0, 114, 178), "vae_decoder": (230, 159, 0), "other": (160, 160, 160)}
ROW, BAR, LEFT, RIGHT, TOP = 34, 22, 230, 220, 60


def draw_chart(record: dict, path: str | Path) -> None:
    rows = []  # (label, config, median stages, ratio text)
    for e in record["engines"]:
        for i, c in enumerate(e["configs"]):
            ratio = ""
            if e["engine"] == "edgediff":
                ratio = "  ".join(
                    f"{r[i]['total']:.2f}x {label}" for label, r in e.get("time_ratio_to", {}).items()
                    if r[i]["total"] is not None and not label.startswith("edgediff")
                )
            rows.append((e["label"], f"{c['steps']} steps, batch {c['batch']}", c["median"], ratio))
    longest = max((r[2]["total"] for r in rows), default=1.0) or 1.0
    width, height = 1100, TOP + ROW * max(len(rows), 1) + 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    s = record["settings"]
    draw.text(
        (10, 10),
        f"edgediff bench: {s['width']}x{s['height']}, median of {s['runs']} runs (seconds)",
        fill="black",
        font=font,
    )
    x = 10
    for stage, colour in COLOURS.items():
        draw.rectangle([x, 32, x + 12, 44], fill=colour)
        draw.text((x + 16, 32), stage, fill="black", font=font)
        x += 110
    scale = (width - LEFT - RIGHT) / longest
    for k, (label, config, med, ratio) in enumerate(rows):
        y = TOP + k * ROW
        draw.text((10, y + 5), f"{label[:24]} | {config}", fill="black", font=font)
        x = LEFT
        for stage, colour in COLOURS.items():
            w = max(med[stage], 0.0) * scale
            draw.rectangle([x, y, x + w, y + BAR], fill=colour)
            x += w
        draw.text((x + 6, y + 5), f"{med['total']:.2f} s  {ratio}", fill="black", font=font)
    image.save(Path(path), format="PNG")
