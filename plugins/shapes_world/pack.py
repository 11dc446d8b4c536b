"""Keep the embedded model small enough to ship inside the package (≤ 25 MB).

Nearly half of it is the CLIP token table (49,408 × 64 floats), of which the shapes
world uses a few dozen rows. Storing that one table in float16 halves the text encoder's
file; loaders up-cast it to the model's dtype (aipaint always loads with an explicit
dtype). Every number the evaluation reports is measured on the packed model.

Usage: python -m aipaint_plugins.shapes_world.pack zoo/models/shapes-tiny
"""

from __future__ import annotations

import sys
from pathlib import Path

TOKEN_TABLE_SUFFIX = "embeddings.token_embedding.weight"


def pack_text_encoder(model_dir: Path | str) -> int:
    """Store the token table of ``text_encoder/model.safetensors`` in float16, in place.

    Returns the bytes saved. Idempotent.
    """
    import os

    import torch
    from safetensors.torch import load_file, save_file

    path = Path(model_dir) / "text_encoder" / "model.safetensors"
    before = path.stat().st_size
    tensors = load_file(str(path))
    changed = False
    for name, tensor in tensors.items():
        if name.endswith(TOKEN_TABLE_SUFFIX) and tensor.dtype == torch.float32:
            tensors[name] = tensor.to(torch.float16)
            changed = True
    if not changed:
        return 0
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return before - path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    for folder in args or ["zoo/models/shapes-tiny"]:
        saved = pack_text_encoder(folder)
        print(f"{folder}: saved {saved / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
