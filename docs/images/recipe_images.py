"""Make the recipe pictures of docs/workflows.md (docs/images/recipe_*.png) with the embedded model.

    OMP_NUM_THREADS=1 python docs/images/recipe_images.py

Each picture shows a recipe's input(s) and output side by side (pixels enlarged, not smoothed, where
the embedded model's 32x32 output is small). Settings are fixed, so a rerun makes the same pictures.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from aipaint_plugins import recipes
from aipaint_plugins.recipes.cli import contact_sheet_of
from aipaint_plugins.recipes.layout import contact_sheet
from PIL import Image, ImageDraw

import aipaint
from aipaint.errors import AipaintWarning

HERE = Path(__file__).resolve().parent
SEED = 7


def panel(name: str, items: list[tuple[str, Image.Image]], cell: int = 160) -> None:
    sheet = contact_sheet([image for _, image in items], [label for label, _ in items], cell=cell)
    sheet.save(HERE / f"recipe_{name}.png", optimize=True)
    print(HERE / f"recipe_{name}.png", sheet.size)


def main() -> None:
    warnings.simplefilter("ignore", AipaintWarning)
    pipe = aipaint.load()
    work = HERE / "_recipe_inputs"
    work.mkdir(exist_ok=True)
    picture = pipe.txt2img("a big red circle on the left, on a white background", seed=1).image
    picture.save(work / "picture.png")
    drawing = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(drawing).rectangle((7, 7, 24, 24), outline="black", width=2)
    drawing.save(work / "drawing.png")
    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle((18, 4, 31, 27), fill=255)
    mask.save(work / "mask.png")
    grey = picture.convert("L").convert("RGB")
    grey.save(work / "grey.png")

    r = recipes.avatar(pipe, image=str(work / "picture.png"), prompt="a big blue circle on the left, on a white background",
                       seed=SEED)
    panel("avatar", [("portrait (input)", picture), ("avatar: img2img, face fix, x2", r.image)])
    r = recipes.character(pipe, character="a big green triangle", seed=SEED,
                          scenes=["on the left, on a white background", "on the right, on a white background",
                                  "in the center, on a black background"])
    panel("character", [(f"scene {i + 1}", image) for i, image in enumerate(r.images)])
    r = recipes.lineart(pipe, image=str(work / "drawing.png"), prompt="a big yellow square in the center, on a white background",
                        seed=SEED)
    panel("lineart", [("drawing (input)", drawing), ("coloured, lines kept", r.image)])
    r = recipes.stylize(pipe, image=str(work / "picture.png"), prompt="a big purple circle on the left", style="watercolour",
                        seed=SEED)
    panel("stylize", [("picture (input)", picture), ("style=watercolour", r.image)])
    r = recipes.old_photo(pipe, image=str(work / "grey.png"), colourise=True,
                          colour_prompt="a big red circle on the left, on a white background", seed=SEED)
    panel("old-photo", [("grey photo (input)", grey), ("denoised, colourised, x2", r.image)])
    r = recipes.retouch(pipe, image=str(work / "picture.png"), mask=str(work / "mask.png"),
                        prompt="a big red circle on the left and a blue square on the right, on a white background",
                        seed=SEED)
    panel("retouch", [("picture", picture), ("mask", mask.convert("RGB")), ("retouched", r.image)])
    r = recipes.ad(pipe, description="a big yellow star in the center", audience="children", brand="playful",
                   variants=4, seed=SEED)
    contact_sheet_of(r, "ad: brand 'playful'").save(HERE / "recipe_ad.png", optimize=True)
    print(HERE / "recipe_ad.png")
    r = recipes.variations(pipe, image=str(work / "picture.png"), prompt="a big red circle on the left, on a white background",
                           count=4, seed=SEED)
    panel("variations", [("input", picture)] + [(f"seed {s}", image) for s, image in zip(r.seeds, r.images)], cell=120)
    r = recipes.sticker(pipe, prompt="a big green circle in the center", upscale=4, outline_width=6, seed=SEED)
    checker = Image.new("RGB", r.image.size, (200, 200, 200))
    ImageDraw.Draw(checker).rectangle((0, 0, r.image.width // 2, r.image.height // 2), fill=(235, 235, 235))
    ImageDraw.Draw(checker).rectangle((r.image.width // 2, r.image.height // 2, r.image.width, r.image.height),
                                      fill=(235, 235, 235))
    checker.paste(r.image, (0, 0), r.image)
    panel("sticker", [("sticker (transparent: grey shows through)", checker)])
    r = recipes.cover(pipe, prompt="a big red circle on the left, on a white background", title="Circles",
                      lines=["The shapes issue", "Spring 2026"], upscale=8, seed=SEED)
    r.image.save(HERE / "recipe_cover.png", optimize=True)
    print(HERE / "recipe_cover.png")
    r = recipes.qr(pipe, payload="https://example.com", prompt="a big blue circle in the center, on a white background",
                   seed=SEED)
    r.image.save(HERE / "recipe_qr.png", optimize=True)
    print(HERE / "recipe_qr.png")
    for path in work.iterdir():
        path.unlink()
    work.rmdir()


if __name__ == "__main__":
    main()
