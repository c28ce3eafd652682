"""Small PDFs built in code for the tests: hand-written files (so every box, /Rotate and drawing is known
exactly), an encrypted one (pypdf, RC4 so no crypto package is needed), broken ones and hostile ones (a form
that draws itself; an XFA form)."""

from __future__ import annotations

import io
from dataclasses import dataclass

A4 = (0.0, 0.0, 595.0, 842.0)  # the usual rounded A4 MediaBox, in points
RED_RECT = (100.0, 600.0, 150.0, 80.0)  # x, y, width, height in user space: the rectangle red_page draws


@dataclass(frozen=True)
class FixturePage:
    media: tuple[float, float, float, float] = A4  # MediaBox (left, bottom, right, top)
    crop: tuple[float, float, float, float] | None = None  # CropBox, if any
    rotate: int = 0  # /Rotate
    content: bytes = b""  # the content stream
    annots: str = ""  # the /Annots array's items, as PDF source text


def rect_content(x: float, y: float, w: float, h: float, rgb=(1, 0, 0), text: str = "") -> bytes:
    """A filled rectangle at (x, y) (bottom-left corner, user space) of w x h points, plus optional text
    in 12-pt Helvetica at (72, 72)."""
    r, g, b = rgb
    ops = f"{r} {g} {b} rg {x:g} {y:g} {w:g} {h:g} re f\n"
    if text:
        ops += f"0 0 0 rg BT /F1 12 Tf 72 72 Td ({text}) Tj ET\n"
    return ops.encode("latin-1")


def red_page(**kwargs) -> FixturePage:
    return FixturePage(content=rect_content(*RED_RECT, text="Hello, PDF"), **kwargs)


def _box(b) -> str:
    return "[" + " ".join(f"{v:g}" for v in b) + "]"


def build_pdf(pages: list[FixturePage], forms: dict[str, bytes] | None = None, catalog: str = "") -> bytes:
    """A complete PDF (catalog, page tree, one content stream per page, Helvetica, exact xref).

    `forms`: form XObjects by name, each an A4-sized content stream; every page and every form has all of
    them in its resources (so `/X Do` draws form X, and a form may draw itself). `catalog`: more entries of
    the document catalog, as PDF source text."""
    objects: list[bytes] = [b"", b""]  # 1: catalog, 2: page tree, filled in below
    font_id = 3
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    forms = forms or {}
    first_form = len(objects) + 1
    xobjects = "".join(f" /{name} {first_form + i} 0 R" for i, name in enumerate(forms))
    resources = f"/Font << /F1 {font_id} 0 R >>" + (f" /XObject <<{xobjects} >>" if forms else "")
    for content in forms.values():
        objects.append(
            f"<< /Type /XObject /Subtype /Form /BBox {_box(A4)} /Resources << {resources} >>"
            f" /Length {len(content)} >>\nstream\n".encode() + content + b"\nendstream"
        )
    kids = []
    for page in pages:
        content_id = len(objects) + 1
        objects.append(b"<< /Length %d >>\nstream\n" % len(page.content) + page.content + b"\nendstream")
        page_id = len(objects) + 1
        extra = f" /CropBox {_box(page.crop)}" if page.crop else ""
        extra += f" /Rotate {page.rotate}" if page.rotate else ""
        extra += f" /Annots [{page.annots}]" if page.annots else ""
        objects.append(
            (
                f"<< /Type /Page /Parent 2 0 R /MediaBox {_box(page.media)}{extra}"
                f" /Resources << {resources} >> /Contents {content_id} 0 R >>"
            ).encode()
        )
        kids.append(f"{page_id} 0 R")
    objects[0] = f"<< /Type /Catalog /Pages 2 0 R{' ' + catalog if catalog else ''} >>".encode()
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>".encode()

    out = io.BytesIO()
    out.write(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % i + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def encrypted_pdf(password: str, pages: list[FixturePage] | None = None) -> bytes:
    """build_pdf's file encrypted with a user password (RC4-128: pypdf does it without a crypto package)."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(build_pdf(pages or [red_page()]))))
    writer.encrypt(user_password=password, owner_password=password + "-owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def self_drawing_pdf(good_pages: int = 0) -> bytes:
    """A 1-KB PDF whose last page draws form X, which draws itself twice: 2^n copies at depth n. pdfium
    loads and renders it without end, growing without bound (24 GB in two minutes), deaf to Ctrl-C. The
    `good_pages` before it are plain red pages."""
    pages = [red_page() for _ in range(good_pages)] + [FixturePage(content=b"/X Do")]
    return build_pdf(pages, forms={"X": b"/X Do /X Do"})


def xfa_pdf() -> bytes:
    """A red page whose catalog declares an XFA form (an empty XDP packet), which pdfium without XFA
    support cannot run; pypdfium2 then logs a warning (and a pip command) on stderr."""
    xdp = "(<xdp:xdp xmlns:xdp='http://ns.adobe.com/xdp/'/>)"
    return build_pdf([red_page()], catalog=f"/AcroForm << /Fields [] /XFA {xdp} /NeedsRendering true >>")
