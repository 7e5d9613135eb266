"""Images for multimodal requests: a URL is sent as it is, a local file as a base64 `data:` URL."""

from __future__ import annotations

import base64
import mimetypes
from pathlib import Path

from llmstack.bench.errors import BenchInputError

__all__ = ["image_mime_type", "image_url"]

# Magic numbers of the formats vision-language servers accept; the file name's extension is only a fallback.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


def image_url(image: str) -> str:
    """What goes into `image_url.url`: http(s) and data: URLs unchanged, a local file inlined."""
    if image.startswith(("http://", "https://", "data:")):
        return image
    path = Path(image)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BenchInputError(f"cannot read the image {image}: {exc}") from exc
    mime = image_mime_type(data, path.name)
    if mime is None:
        raise BenchInputError(
            f"{image} is not an image this benchmark recognises (PNG, JPEG, GIF, WebP, BMP)"
        )
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_mime_type(data: bytes, name: str = "") -> str | None:
    for signature, mime in _SIGNATURES:
        if data.startswith(signature):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    guessed, _ = mimetypes.guess_type(name)
    return guessed if guessed is not None and guessed.startswith("image/") else None
